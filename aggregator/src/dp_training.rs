//! The participant's side of differential privacy for `fedsb train` and
//! `fedsb join`: the procedure is `fedsb_participant::dp` (shared with the
//! browser participant); this module keeps the privacy ledger in a file
//! ([`LedgerFile`]) and runs the steps blockingly ([`train_steps_dp`]).

use std::path::Path;

use anyhow::Context;
use fedsb_engine::data::Example;
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::model::BertTokenizer;
pub use fedsb_participant::dp::{DpStepsOutcome, DpTraining};
use fedsb_participant::write_file_atomically;

/// A [`DpTraining`]'s ledger kept in a JSON file.
pub trait LedgerFile {
    /// Adds the steps of an earlier run (a ledger saved by
    /// [`Self::save_ledger`]) to this one, so that restarting a participant
    /// never resets what it has spent; `false` when there is no file yet.
    fn load_ledger(&mut self, path: &Path) -> anyhow::Result<bool>;
    /// Writes the ledger to `path` (atomically: a temporary file, then rename).
    fn save_ledger(&self, path: &Path) -> anyhow::Result<()>;
}

impl LedgerFile for DpTraining {
    fn load_ledger(&mut self, path: &Path) -> anyhow::Result<bool> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the privacy ledger {}", path.display()))
            }
        };
        self.merge_ledger_json(&text, &path.display().to_string())?;
        Ok(true)
    }

    fn save_ledger(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Synced before it replaces the old ledger: a crash never loses
        // privacy already spent.
        write_file_atomically(path, self.ledger_json().as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// [`fedsb_participant::train_steps_dp`], blocking on the GPU.
pub fn train_steps_dp(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    examples: &[Example],
    dp: &mut DpTraining,
    steps: u32,
    opt: &AdamW,
) -> anyhow::Result<DpStepsOutcome> {
    Ok(pollster::block_on(fedsb_participant::train_steps_dp(
        encoder, tokenizer, examples, dp, steps, opt,
    ))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedsb_privacy::AccountantKind;
    use fedsb_protocol::PrivacyPolicy;

    fn policy(epsilon: f64) -> PrivacyPolicy {
        PrivacyPolicy {
            epsilon,
            delta: 1e-5,
            clip_norm: 0.1,
        }
    }

    #[test]
    fn the_ledger_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("ledger.json");
        let mut first =
            DpTraining::calibrate(&policy(3.0), 200, 16, 40, AccountantKind::Rdp).unwrap();
        assert!(!first.load_ledger(&path).unwrap(), "no ledger yet");
        first.record(30).unwrap();
        first.save_ledger(&path).unwrap();
        let mut second =
            DpTraining::calibrate(&policy(3.0), 200, 16, 40, AccountantKind::Rdp).unwrap();
        assert!(second.load_ledger(&path).unwrap());
        assert_eq!(second.steps_taken(), 30);
        assert_eq!(
            second.epsilon_spent().unwrap(),
            first.epsilon_spent().unwrap()
        );
        assert!(second.check(10).unwrap().within_budget);
        assert!(!second.check(20).unwrap().within_budget);
        std::fs::write(&path, "not json").unwrap();
        let e = second.load_ledger(&path).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
