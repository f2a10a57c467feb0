//! Browser bindings of fedsb (being written).
