//! The fedsb engine (work in progress).
