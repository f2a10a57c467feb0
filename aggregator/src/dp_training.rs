//! The participant's side of differential privacy, used by `fedsb train`,
//! `fedsb join` (and `fedsb sim`): σ calibrated for all the steps it plans to
//! take, a [`PrivacyLedger`] of what it has spent, and DP-SGD steps on the
//! GPU ([`train_steps_dp`]).

use std::path::Path;

use anyhow::{bail, Context};
use fedsb_engine::data::Example;
use fedsb_engine::dp::{dp_sgd_step, DpSgdConfig, NoiseSource};
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::model::BertTokenizer;
use fedsb_privacy::{
    calibrate_noise_multiplier, AccountantKind, BudgetCheck, CalibrationTarget, PrivacyBudget,
    PrivacyLedger, TrainingSegment,
};
use fedsb_protocol::{PrivacyPolicy, PrivacyReport};

/// A participant's DP-SGD parameters and what it has spent.
///
/// σ is calibrated once, for every step the participant plans to take
/// (`rounds × local steps`) at `q = batch / N`, so that exactly that many
/// steps spend at most the target ε. Every round's steps are recorded in the
/// [`PrivacyLedger`]; [`Self::check`] says whether the next round still fits.
#[derive(Debug)]
pub struct DpTraining {
    /// σ, C, q and N of every step.
    pub config: DpSgdConfig,
    /// The steps σ was calibrated for (0 when σ was given).
    pub planned_steps: u64,
    ledger: PrivacyLedger,
    noise: NoiseSource,
}

impl DpTraining {
    /// Calibrates σ so that `planned_steps` steps at `q = min(1, batch /
    /// dataset_size)` spend at most `policy.epsilon` at `policy.delta`.
    pub fn calibrate(
        policy: &PrivacyPolicy,
        dataset_size: usize,
        batch_size: usize,
        planned_steps: u64,
        accountant: AccountantKind,
    ) -> anyhow::Result<Self> {
        let sample_rate = Self::sample_rate(dataset_size, batch_size)?;
        if planned_steps == 0 {
            bail!("differential privacy: no steps to calibrate the noise for");
        }
        let target = CalibrationTarget {
            epsilon: policy.epsilon,
            delta: policy.delta,
            sample_rate,
            steps: planned_steps,
        };
        let sigma = calibrate_noise_multiplier(&target, accountant).with_context(|| {
            format!(
                "calibrating the noise for ε = {}, δ = {} over {planned_steps} steps at q = {sample_rate:.6}",
                policy.epsilon, policy.delta
            )
        })?;
        let mut dp = Self::with_noise_multiplier(
            sigma,
            policy.clip_norm,
            dataset_size,
            batch_size,
            PrivacyBudget::new(policy.epsilon, policy.delta)?,
            accountant,
        )?;
        dp.planned_steps = planned_steps;
        Ok(dp)
    }

    /// A given σ, judged against `budget`.
    pub fn with_noise_multiplier(
        noise_multiplier: f64,
        clip_norm: f64,
        dataset_size: usize,
        batch_size: usize,
        budget: PrivacyBudget,
        accountant: AccountantKind,
    ) -> anyhow::Result<Self> {
        let sample_rate = Self::sample_rate(dataset_size, batch_size)?;
        TrainingSegment::new(sample_rate, noise_multiplier, 1)
            .context("differential privacy: invalid noise multiplier or sample rate")?;
        let config = DpSgdConfig {
            noise_multiplier,
            clip_norm,
            sample_rate,
            dataset_size,
        };
        config.validate()?;
        Ok(Self {
            config,
            planned_steps: 0,
            ledger: PrivacyLedger::new(budget, accountant)?,
            noise: NoiseSource::from_os_entropy()?,
        })
    }

    /// `q = min(1, batch / N)`.
    pub fn sample_rate(dataset_size: usize, batch_size: usize) -> anyhow::Result<f64> {
        if dataset_size == 0 {
            bail!("differential privacy: no training examples");
        }
        if batch_size == 0 {
            bail!("differential privacy: the batch size must be positive");
        }
        Ok((batch_size as f64 / dataset_size as f64).min(1.0))
    }

    /// The budget's δ.
    pub fn delta(&self) -> f64 {
        self.ledger.budget().delta
    }

    /// The budget's ε.
    pub fn epsilon_budget(&self) -> f64 {
        self.ledger.budget().epsilon
    }

    /// The accountant used.
    pub fn accountant(&self) -> AccountantKind {
        self.ledger.accountant()
    }

    /// Adds the steps of an earlier run (a ledger saved by
    /// [`Self::save_ledger`]) to this one, so that restarting a participant
    /// never resets what it has spent. The earlier budget and accountant do
    /// not matter: its steps are judged by this run's.
    pub fn load_ledger(&mut self, path: &Path) -> anyhow::Result<bool> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the privacy ledger {}", path.display()))
            }
        };
        let earlier: PrivacyLedger = serde_json::from_str(&text).with_context(|| {
            format!(
                "the privacy ledger {} is corrupt; it records what this participant has spent, \
                 so it is not ignored: restore it, or delete it only if no update was ever sent",
                path.display()
            )
        })?;
        for segment in earlier.segments() {
            self.ledger.record(*segment)?;
        }
        Ok(true)
    }

    /// Writes the ledger to `path` (atomically: a temporary file, then rename).
    pub fn save_ledger(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.part");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.ledger)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.ledger.total_steps()
    }

    /// ε spent so far (at the budget's δ).
    pub fn epsilon_spent(&self) -> anyhow::Result<f64> {
        Ok(self.ledger.epsilon_spent()?)
    }

    /// Would `steps` more steps stay within the budget?
    pub fn check(&self, steps: u64) -> anyhow::Result<BudgetCheck> {
        let segment =
            TrainingSegment::new(self.config.sample_rate, self.config.noise_multiplier, steps)?;
        Ok(self.ledger.check(&segment)?)
    }

    /// Records `steps` steps taken; returns the ε spent now.
    pub fn record(&mut self, steps: u64) -> anyhow::Result<f64> {
        self.ledger.record(TrainingSegment::new(
            self.config.sample_rate,
            self.config.noise_multiplier,
            steps,
        )?)?;
        self.epsilon_spent()
    }

    /// The report sent with an update trained with `steps` steps (after
    /// [`Self::record`]).
    pub fn report(&self, steps: u64) -> anyhow::Result<PrivacyReport> {
        Ok(PrivacyReport {
            noise_multiplier: self.config.noise_multiplier,
            sample_rate: self.config.sample_rate,
            steps,
            clip_norm: self.config.clip_norm,
            delta: self.delta(),
            epsilon_spent: self.epsilon_spent()?,
        })
    }
}

/// What [`train_steps_dp`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpStepsOutcome {
    /// Examples in all Poisson-sampled batches.
    pub samples: u64,
    /// Mean loss over those examples (0 if every batch was empty).
    pub mean_loss: f32,
    /// ε spent after these steps.
    pub epsilon_spent: f64,
}

/// `steps` DP-SGD steps (Poisson sampling, joint clipping, noise, AdamW) on
/// `examples` from the encoder's current state, recorded in `dp`'s ledger
/// (steps are recorded even when a later one fails: they have been spent).
pub fn train_steps_dp(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    examples: &[Example],
    dp: &mut DpTraining,
    steps: u32,
    opt: &AdamW,
) -> anyhow::Result<DpStepsOutcome> {
    let mut samples = 0u64;
    let mut loss_sum = 0f64;
    let mut taken = 0u64;
    let mut result = Ok(());
    for step in 1..=steps {
        let out = match pollster::block_on(dp_sgd_step(
            encoder,
            tokenizer,
            examples,
            &dp.config,
            &mut dp.noise,
            opt,
        )) {
            Ok(o) => o,
            Err(e) => {
                result = Err(anyhow::Error::from(e));
                break;
            }
        };
        taken += 1;
        samples += out.batch_size as u64;
        if let Some(loss) = out.loss {
            if !loss.is_finite() {
                result = Err(anyhow::anyhow!(
                    "DP-SGD diverged at step {step} (loss {loss})"
                ));
                break;
            }
            loss_sum += f64::from(loss) * out.batch_size as f64;
        }
        tracing::debug!(step, batch = out.batch_size, loss = ?out.loss, "DP-SGD step");
    }
    let epsilon_spent = dp.record(taken)?;
    result?;
    Ok(DpStepsOutcome {
        samples,
        mean_loss: (loss_sum / samples.max(1) as f64) as f32,
        epsilon_spent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(epsilon: f64) -> PrivacyPolicy {
        PrivacyPolicy {
            epsilon,
            delta: 1e-5,
            clip_norm: 0.1,
        }
    }

    #[test]
    fn calibration_spends_at_most_the_target_over_the_planned_steps() {
        let mut dp = DpTraining::calibrate(&policy(3.0), 200, 16, 40, AccountantKind::Rdp).unwrap();
        assert!((dp.config.sample_rate - 0.08).abs() < 1e-12);
        assert!(dp.config.noise_multiplier > 0.5, "{:?}", dp.config);
        assert_eq!(dp.epsilon_spent().unwrap(), 0.0);
        // Four rounds of ten steps fit; a fifth does not.
        for round in 1..=4 {
            let c = dp.check(10).unwrap();
            assert!(c.within_budget, "round {round}: {c:?}");
            let eps = dp.record(10).unwrap();
            assert!(eps > 0.0 && eps <= 3.0, "round {round}: ε {eps}");
            let report = dp.report(10).unwrap();
            assert_eq!(report.steps, 10);
            assert_eq!(report.epsilon_spent, eps);
            assert_eq!(report.clip_norm, 0.1);
        }
        assert!(dp.epsilon_spent().unwrap() > 2.9, "calibration is tight");
        let c = dp.check(10).unwrap();
        assert!(!c.within_budget && c.epsilon_after > 3.0, "{c:?}");
        assert_eq!(dp.steps_taken(), 40);
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

    #[test]
    fn bad_parameters_get_clear_errors() {
        let e = DpTraining::calibrate(&policy(3.0), 0, 16, 40, AccountantKind::Rdp).unwrap_err();
        assert!(e.to_string().contains("no training examples"), "{e}");
        let e = DpTraining::calibrate(&policy(3.0), 100, 16, 0, AccountantKind::Rdp).unwrap_err();
        assert!(e.to_string().contains("no steps"), "{e}");
        let e = DpTraining::calibrate(&policy(-1.0), 100, 16, 5, AccountantKind::Rdp).unwrap_err();
        assert!(format!("{e:#}").contains("calibrating"), "{e:#}");
        let mut p = policy(3.0);
        p.clip_norm = 0.0;
        let e = DpTraining::calibrate(&p, 100, 16, 5, AccountantKind::Rdp).unwrap_err();
        assert!(e.to_string().contains("clip norm"), "{e}");
        // A batch larger than the data: q = 1.
        assert_eq!(DpTraining::sample_rate(10, 32).unwrap(), 1.0);
    }
}
