//! The participant's side of differential privacy, shared by `fedsb join`,
//! `fedsb train` and the browser participant: σ calibrated for all the steps
//! it plans to take, a [`PrivacyLedger`] of what it has spent (a
//! serializable value: `fedsb join` saves it to a file, the browser to
//! IndexedDB), and DP-SGD steps on the GPU ([`train_steps_dp`],
//! [`train_round_dp`]).

use fedsb_engine::data::Example;
use fedsb_engine::dp::{dp_sgd_step, DpSgdConfig, NoiseSource};
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::model::BertTokenizer;
use fedsb_engine::reference::LoraSbAdapters;
use fedsb_privacy::{
    calibrate_noise_multiplier, AccountantKind, BudgetCheck, CalibrationTarget, PrivacyBudget,
    PrivacyLedger, TrainingSegment,
};
use fedsb_protocol::{AdapterState, PrivacyPolicy, PrivacyReport, RoundId};

use crate::adapter_file::{engine_to_state, state_to_engine, ModuleRef};
use crate::{LocalOptimizer, LocalRound, ParticipantError};

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
    ) -> Result<Self, ParticipantError> {
        let sample_rate = Self::sample_rate(dataset_size, batch_size)?;
        if planned_steps == 0 {
            return Err(ParticipantError::Invalid(
                "differential privacy: no steps to calibrate the noise for".into(),
            ));
        }
        let target = CalibrationTarget {
            epsilon: policy.epsilon,
            delta: policy.delta,
            sample_rate,
            steps: planned_steps,
        };
        let sigma = calibrate_noise_multiplier(&target, accountant).map_err(|e| {
            ParticipantError::Invalid(format!(
                "calibrating the noise for ε = {}, δ = {} over {planned_steps} steps at q = {sample_rate:.6}: {e}",
                policy.epsilon, policy.delta
            ))
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
    ) -> Result<Self, ParticipantError> {
        let sample_rate = Self::sample_rate(dataset_size, batch_size)?;
        TrainingSegment::new(sample_rate, noise_multiplier, 1).map_err(|e| {
            ParticipantError::Invalid(format!(
                "differential privacy: invalid noise multiplier or sample rate: {e}"
            ))
        })?;
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
    pub fn sample_rate(dataset_size: usize, batch_size: usize) -> Result<f64, ParticipantError> {
        if dataset_size == 0 {
            return Err(ParticipantError::Invalid(
                "differential privacy: no training examples".into(),
            ));
        }
        if batch_size == 0 {
            return Err(ParticipantError::Invalid(
                "differential privacy: the batch size must be positive".into(),
            ));
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

    /// The ledger of the steps taken, to persist (it serializes with serde;
    /// [`Self::ledger_json`] gives the JSON).
    pub fn ledger(&self) -> &PrivacyLedger {
        &self.ledger
    }

    /// The ledger as JSON, for [`Self::merge_ledger_json`] after a restart.
    pub fn ledger_json(&self) -> String {
        serde_json::to_string_pretty(&self.ledger).expect("a ledger always serializes")
    }

    /// Adds the steps of an earlier run's ledger to this one, so that
    /// restarting a participant never resets what it has spent. The earlier
    /// budget and accountant do not matter: its steps are judged by this
    /// run's.
    pub fn merge_ledger(&mut self, earlier: &PrivacyLedger) -> Result<(), ParticipantError> {
        for segment in earlier.segments() {
            self.ledger.record(*segment)?;
        }
        Ok(())
    }

    /// [`Self::merge_ledger`] from the JSON of [`Self::ledger_json`]; `what`
    /// names where it was kept (for the error). A corrupt ledger is an
    /// error, never ignored: it records what this participant has spent.
    pub fn merge_ledger_json(&mut self, json: &str, what: &str) -> Result<(), ParticipantError> {
        let earlier: PrivacyLedger = serde_json::from_str(json).map_err(|e| {
            ParticipantError::Invalid(format!(
                "the privacy ledger {what} is corrupt ({e}); it records what this participant has spent, \
                 so it is not ignored: restore it, or delete it only if no update was ever sent"
            ))
        })?;
        self.merge_ledger(&earlier)
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.ledger.total_steps()
    }

    /// ε spent so far (at the budget's δ).
    pub fn epsilon_spent(&self) -> Result<f64, ParticipantError> {
        Ok(self.ledger.epsilon_spent()?)
    }

    /// Would `steps` more steps stay within the budget?
    pub fn check(&self, steps: u64) -> Result<BudgetCheck, ParticipantError> {
        let segment =
            TrainingSegment::new(self.config.sample_rate, self.config.noise_multiplier, steps)?;
        Ok(self.ledger.check(&segment)?)
    }

    /// The message for a round of `steps` steps that `check` found over the
    /// budget; it starts with "privacy budget exhausted".
    pub fn exhausted_message(&self, check: &BudgetCheck, round: RoundId, steps: u32) -> String {
        format!(
            "privacy budget exhausted: {} DP-SGD steps spent ε = {:.4} of the budget ε = {} (δ = {}); \
             round {round}'s {steps} steps would bring it to ε = {:.4}, so this participant stops here",
            self.steps_taken(),
            check.epsilon_spent,
            check.epsilon_budget,
            self.delta(),
            check.epsilon_after
        )
    }

    /// Records `steps` steps taken; returns the ε spent now.
    pub fn record(&mut self, steps: u64) -> Result<f64, ParticipantError> {
        self.ledger.record(TrainingSegment::new(
            self.config.sample_rate,
            self.config.noise_multiplier,
            steps,
        )?)?;
        self.epsilon_spent()
    }

    /// The report sent with an update trained with `steps` steps (after
    /// [`Self::record`]).
    pub fn report(&self, steps: u64) -> Result<PrivacyReport, ParticipantError> {
        Ok(PrivacyReport {
            noise_multiplier: self.config.noise_multiplier,
            sample_rate: self.config.sample_rate,
            steps,
            clip_norm: self.config.clip_norm,
            delta: self.delta(),
            epsilon_spent: self.epsilon_spent()?,
        })
    }

    /// The update weight of a round of `steps` steps: the expected number of
    /// samples, q·N per step (at least 1). The actual Poisson batch sizes
    /// depend on who is in the data, which the DP analysis does not cover
    /// releasing.
    pub fn update_weight(&self, steps: u32) -> u64 {
        (self.config.expected_batch() * f64::from(steps))
            .round()
            .max(1.0) as u64
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
pub async fn train_steps_dp(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    examples: &[Example],
    dp: &mut DpTraining,
    steps: u32,
    opt: &AdamW,
) -> Result<DpStepsOutcome, ParticipantError> {
    let mut samples = 0u64;
    let mut loss_sum = 0f64;
    let mut taken = 0u64;
    let mut result = Ok(());
    for step in 1..=steps {
        let out =
            match dp_sgd_step(encoder, tokenizer, examples, &dp.config, &mut dp.noise, opt).await {
                Ok(o) => o,
                Err(e) => {
                    result = Err(ParticipantError::from(e));
                    break;
                }
            };
        taken += 1;
        samples += out.batch_size as u64;
        if let Some(loss) = out.loss {
            if !loss.is_finite() {
                result = Err(ParticipantError::Invalid(format!(
                    "DP-SGD diverged at step {step} (loss {loss})"
                )));
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

/// One DP-SGD local round: sets the global `R`s and head (and `opt`'s
/// optimizer state, [`LocalOptimizer`]), takes `steps`
/// DP-SGD steps (recorded in `dp`'s ledger), reads the result back. The
/// round's `samples` is the update weight ([`DpTraining::update_weight`]);
/// the report goes with the update. The caller checks the budget first
/// ([`DpTraining::check`]).
#[allow(clippy::too_many_arguments)]
pub async fn train_round_dp(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    frozen: &LoraSbAdapters<f32>,
    modules: &[ModuleRef],
    examples: &[Example],
    dp: &mut DpTraining,
    global: &AdapterState,
    steps: u32,
    opt: &mut LocalOptimizer,
    round: RoundId,
) -> Result<(LocalRound, PrivacyReport, DpStepsOutcome), ParticipantError> {
    let (adapters, head) = state_to_engine(frozen, modules, global)?;
    opt.begin_round(encoder, &adapters, &head)?;
    // DP-SGD: Poisson-sampled batches instead of the shuffled sampler.
    let out = train_steps_dp(encoder, tokenizer, examples, dp, steps, &opt.adamw)
        .await
        .map_err(|e| ParticipantError::Invalid(format!("round {round}: DP-SGD: {e}")))?;
    let trained = encoder.read_trainable().await?;
    opt.end_round(encoder).await?;
    let state = engine_to_state(&trained, modules)?;
    let report = dp.report(u64::from(steps))?;
    Ok((
        LocalRound {
            state,
            samples: dp.update_weight(steps),
            mean_loss: out.mean_loss,
        },
        report,
        out,
    ))
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
        let m = dp.exhausted_message(&c, RoundId(5), 10);
        assert!(m.starts_with("privacy budget exhausted"), "{m}");
        assert_eq!(dp.update_weight(10), 160);
    }

    #[test]
    fn the_ledger_survives_a_restart_as_json() {
        let mut first =
            DpTraining::calibrate(&policy(3.0), 200, 16, 40, AccountantKind::Rdp).unwrap();
        first.record(30).unwrap();
        let json = first.ledger_json();
        let mut second =
            DpTraining::calibrate(&policy(3.0), 200, 16, 40, AccountantKind::Rdp).unwrap();
        second.merge_ledger_json(&json, "in the test").unwrap();
        assert_eq!(second.steps_taken(), 30);
        assert_eq!(
            second.epsilon_spent().unwrap(),
            first.epsilon_spent().unwrap()
        );
        assert!(second.check(10).unwrap().within_budget);
        assert!(!second.check(20).unwrap().within_budget);
        let e = second.merge_ledger_json("not json", "X").unwrap_err();
        assert!(e.to_string().contains("ledger X is corrupt"), "{e}");
        assert_eq!(
            second.steps_taken(),
            30,
            "nothing merged from a corrupt ledger"
        );
    }

    #[test]
    fn bad_parameters_get_clear_errors() {
        let e = DpTraining::calibrate(&policy(3.0), 0, 16, 40, AccountantKind::Rdp).unwrap_err();
        assert!(e.to_string().contains("no training examples"), "{e}");
        let e = DpTraining::calibrate(&policy(3.0), 100, 16, 0, AccountantKind::Rdp).unwrap_err();
        assert!(e.to_string().contains("no steps"), "{e}");
        let e = DpTraining::calibrate(&policy(-1.0), 100, 16, 5, AccountantKind::Rdp).unwrap_err();
        assert!(e.to_string().contains("calibrating"), "{e}");
        let mut p = policy(3.0);
        p.clip_norm = 0.0;
        let e = DpTraining::calibrate(&p, 100, 16, 5, AccountantKind::Rdp).unwrap_err();
        assert!(e.to_string().contains("clip norm"), "{e}");
        // A batch larger than the data: q = 1.
        assert_eq!(DpTraining::sample_rate(10, 32).unwrap(), 1.0);
    }
}
