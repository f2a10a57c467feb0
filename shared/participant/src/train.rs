//! One local round of a participant (non-DP).

use fedsb_engine::data::Example;
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::model::BertTokenizer;
use fedsb_engine::reference::LoraSbAdapters;
use fedsb_engine::train::{encode_examples, BatchSampler};
use fedsb_protocol::{AdapterState, RoundId};

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

/// Trains `steps` AdamW steps from `global` on batches drawn by `sampler`
/// from `examples`, and reads the result back. `tokenizer`, `frozen` (A, B)
/// and `modules` are a [`crate::TaskModel`]'s.
///
/// The AdamW moments are reset at the start of every round (`set_trainable`
/// does so): the moments describe the loss surface around this participant's
/// previous local `R`, which the global average has replaced; carrying them
/// over would scale the first steps of the new round by stale statistics.
/// The browser participant and `fedsb join` both run this, so their updates
/// come from the same procedure, and a participant that skipped rounds
/// behaves like one that did not.
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
    opt: &AdamW,
    round: RoundId,
) -> Result<LocalRound, ParticipantError> {
    if examples.is_empty() {
        return Err(ParticipantError::Invalid(format!(
            "round {round}: no local examples to train on"
        )));
    }
    let (adapters, head) = state_to_engine(frozen, modules, global)?;
    encoder.set_trainable(&adapters, &head)?;
    let mut samples = 0u64;
    let mut loss_sum = 0f64;
    for step in 1..=steps {
        let idx = sampler.next_batch();
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let (batch, labels) = encode_examples(tokenizer, &refs)?;
        let loss = encoder.train_step(&batch, &labels, opt).await?;
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
    let state = engine_to_state(&trained, modules)?;
    let mean_loss = (loss_sum / samples.max(1) as f64) as f32;
    Ok(LocalRound {
        state,
        samples,
        mean_loss,
    })
}
