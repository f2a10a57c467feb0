//! Differential-privacy accounting for fedsb (work in progress).
