//! fedsb wire protocol (being written).
