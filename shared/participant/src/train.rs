//! One local round of a participant (non-DP).

use fedsb_engine::data::Example;
use fedsb_engine::gpu::adamw::{AdamState, AdamW};
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::model::BertTokenizer;
use fedsb_engine::reference::{ClassifierHead, LoraSbAdapters};
use fedsb_engine::train::{encode_examples, BatchSampler};
use fedsb_protocol::{AdapterState, ClientUpdate, PrivacyReport, RoundId, TaskInfo};

use crate::adapter_file::{engine_to_state, state_to_engine, ModuleRef};
use crate::ParticipantError;

/// The result of one local round.
#[derive(Debug, Clone)]
pub struct LocalRound {
    /// The trained `R`s and head: the update's adapter state.
    pub state: AdapterState,
    /// Examples trained on (with repetition across epochs): the update's weight.
    pub samples: u64,
    /// Sample-weighted mean training loss over the round's steps.
    pub mean_loss: f32,
}

impl LocalRound {
    /// The protocol's update for `round`: the trained state, the samples as
    /// its weight, the mean loss and `privacy` (the DP report of a private
    /// task, none otherwise). Every participant sends this.
    pub fn into_update(self, round: RoundId, privacy: Option<PrivacyReport>) -> ClientUpdate {
        ClientUpdate {
            round,
            num_samples: self.samples,
            train_loss: Some(self.mean_loss),
            privacy,
            adapter: self.state,
        }
    }
}

/// The AdamW every participant of `task` trains with: the task's learning
/// rate (each round then sets its own, [`LocalOptimizer::set_learning_rate`]),
/// the head at `head_learning_rate / learning_rate` of it, and weight decay
/// 0.01. A rate that is not a positive finite number is refused.
pub fn task_adamw(task: &TaskInfo) -> Result<AdamW, ParticipantError> {
    for (name, rate) in [
        ("learning rate", task.learning_rate),
        ("head learning rate", task.head_learning_rate),
    ] {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ParticipantError::Invalid(format!(
                "the task's {name} {rate} is not a positive number"
            )));
        }
    }
    Ok(AdamW {
        lr: task.learning_rate,
        head_lr_scale: task.head_learning_rate / task.learning_rate,
        weight_decay: 0.01,
        ..AdamW::default()
    })
}

/// A participant's local optimizer across rounds: AdamW's hyper-parameters
/// and what becomes of its moments between rounds.
///
/// By default (`keep_moments` false in [`LocalOptimizer::new`]) the moments
/// are reset at the start of every round: each round starts from fresh AdamW state at the new global
/// `R`, so a participant that skipped rounds behaves like one that did not,
/// and the update depends only on the global model and the local batches.
/// With `keep_moments` true the moments and the step count
/// are carried from the end of one round into the next (the global `R` still
/// replaces the local one). With AdamW freshly reset, a round's first step
/// moves every coordinate by about ±lr whatever the size of its gradient;
/// carried moments average the gradient over many rounds' steps instead, so
/// coordinates whose gradient changes sign move less. On SST-2 with 2 local
/// steps per round that made the federation learn much later (BENCHMARKS.md,
/// "The clients' AdamW moments carried across rounds"), hence the default.
/// Carrying them uses only what this participant computed (DP-noised
/// gradients in a private task), so it changes nothing in the privacy
/// accounting.
#[derive(Debug, Clone)]
pub struct LocalOptimizer {
    /// AdamW's hyper-parameters.
    pub adamw: AdamW,
    keep_moments: bool,
    carried: Option<AdamState>,
}

impl LocalOptimizer {
    /// AdamW whose moments are carried from one round into the next when
    /// `keep_moments`, and otherwise reset at the start of every round.
    pub fn new(adamw: AdamW, keep_moments: bool) -> Self {
        Self {
            adamw,
            keep_moments,
            carried: None,
        }
    }

    /// Sets the learning rate of the next round: the one its `RoundOpen`
    /// announced (the task's per-round schedule). A rate that is not a
    /// positive finite number is refused, and the optimizer keeps its rate.
    pub fn set_learning_rate(&mut self, lr: f32) -> Result<(), ParticipantError> {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(ParticipantError::Invalid(format!(
                "the round's learning rate {lr} is not a positive number"
            )));
        }
        self.adamw.lr = lr;
        Ok(())
    }

    /// Sets the global `R`s and head as the encoder's trainable state and the
    /// optimizer state this round starts from.
    pub fn begin_round(
        &self,
        encoder: &mut GpuEncoder<'_>,
        adapters: &LoraSbAdapters<f32>,
        head: &ClassifierHead<f32>,
    ) -> Result<(), ParticipantError> {
        encoder.set_trainable(adapters, head)?;
        if let Some(state) = &self.carried {
            encoder.set_optimizer_state(state)?;
        }
        Ok(())
    }

    /// Keeps the optimizer state of a finished round for the next one, when
    /// the moments are carried.
    pub async fn end_round(&mut self, encoder: &GpuEncoder<'_>) -> Result<(), ParticipantError> {
        if self.keep_moments {
            self.carried = Some(encoder.read_optimizer_state().await?);
        }
        Ok(())
    }
}

/// Trains `steps` AdamW steps from `global` on batches drawn by `sampler`
/// from `examples`, and reads the result back. `tokenizer`, `frozen` (A, B)
/// and `modules` are a [`crate::TaskModel`]'s. The optimizer state at the
/// start is `opt`'s ([`LocalOptimizer`]: fresh by default). The browser
/// participant, `fedsb join` and `fedsb sim` all run this, so their updates
/// come from the same procedure.
#[allow(clippy::too_many_arguments)]
pub async fn train_round(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    frozen: &LoraSbAdapters<f32>,
    modules: &[ModuleRef],
    examples: &[Example],
    sampler: &mut BatchSampler,
    global: &AdapterState,
    steps: u32,
    opt: &mut LocalOptimizer,
    round: RoundId,
) -> Result<LocalRound, ParticipantError> {
    if examples.is_empty() {
        return Err(ParticipantError::Invalid(format!(
            "round {round}: no local examples to train on"
        )));
    }
    let (adapters, head) = state_to_engine(frozen, modules, global)?;
    opt.begin_round(encoder, &adapters, &head)?;
    let mut samples = 0u64;
    let mut loss_sum = 0f64;
    for step in 1..=steps {
        let idx = sampler.next_batch();
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let (batch, labels) = encode_examples(tokenizer, &refs)?;
        let loss = encoder.train_step(&batch, &labels, &opt.adamw).await?;
        if !loss.is_finite() {
            return Err(ParticipantError::Invalid(format!(
                "round {round}: training diverged at step {step} (loss {loss})"
            )));
        }
        samples += idx.len() as u64;
        loss_sum += f64::from(loss) * idx.len() as f64;
        tracing::debug!(%round, step, loss, "local step");
    }
    let trained = encoder.read_trainable().await?;
    opt.end_round(encoder).await?;
    let state = engine_to_state(&trained, modules)?;
    let mean_loss = (loss_sum / samples.max(1) as f64) as f32;
    Ok(LocalRound {
        state,
        samples,
        mean_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(learning_rate: f32, head_learning_rate: f32) -> TaskInfo {
        TaskInfo {
            task_id: "t".into(),
            model_id: "m".into(),
            model_sha256: String::new(),
            module_names: Vec::new(),
            shape: fedsb_protocol::AdapterShape {
                rank: 2,
                modules: 0,
                head_classes: 2,
                head_hidden: 4,
            },
            labels: vec!["a".into(), "b".into()],
            local_steps: 1,
            batch_size: 1,
            learning_rate,
            head_learning_rate,
            max_seq_len: 8,
            total_rounds: 1,
            files: Vec::new(),
            privacy: None,
        }
    }

    #[test]
    fn the_head_trains_at_the_tasks_ratio_in_every_round() {
        let adamw = task_adamw(&task(1e-2, 2.5e-3)).unwrap();
        assert_eq!((adamw.lr, adamw.head_lr()), (1e-2, 2.5e-3));
        assert_eq!(adamw.weight_decay, 0.01);
        // A round at half the rate trains the head at half its rate.
        let mut opt = LocalOptimizer::new(adamw, false);
        opt.set_learning_rate(5e-3).unwrap();
        assert_eq!(opt.adamw.head_lr(), 1.25e-3);
        let same = task_adamw(&task(1e-3, 1e-3)).unwrap();
        assert_eq!(same.head_lr_scale, 1.0);
        for (lr, head) in [(1e-3, 0.0), (1e-3, f32::NAN), (0.0, 1e-3), (-1.0, 1e-3)] {
            let e = task_adamw(&task(lr, head)).unwrap_err();
            assert!(e.to_string().contains("learning rate"), "{lr} {head}: {e}");
        }
    }

    #[test]
    fn the_announced_learning_rate_is_set_and_a_bad_one_refused() {
        let mut opt = LocalOptimizer::new(
            AdamW {
                lr: 1e-3,
                ..AdamW::default()
            },
            false,
        );
        opt.set_learning_rate(2.5e-4).unwrap();
        assert_eq!(opt.adamw.lr, 2.5e-4);
        for bad in [0.0, -1e-3, f32::NAN, f32::INFINITY] {
            let e = opt.set_learning_rate(bad).unwrap_err();
            assert!(e.to_string().contains("learning rate"), "{bad}: {e}");
            assert_eq!(opt.adamw.lr, 2.5e-4, "{bad} changed the rate");
        }
    }
}
