//! Helpers for fedsb end-to-end tests.
