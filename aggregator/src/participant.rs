//! The adapter file and the wire/engine state conversions, used by `fedsb
//! init`, `fedsb join` and `fedsb sim`. The code lives in the library
//! ([`fedsb_aggregator::adapter_file`]) because the server's evaluator reads
//! the same file.

pub use fedsb_aggregator::adapter_file::*;
