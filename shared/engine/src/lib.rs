//! The fedsb engine (work in progress).
pub mod data;
pub mod model;
pub mod reference;
pub mod gpu;
