//! The LoRA-SB adapter file and the wire/engine state conversions; they live
//! in [`fedsb_participant::adapter_file`], shared with the browser participant.

pub use fedsb_participant::adapter_file::*;
