//! The fedsb engine (work in progress).
pub mod data;
pub mod dp;
pub mod gpu;
pub mod model;
pub mod reference;
pub mod train;
