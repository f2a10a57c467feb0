//! The participant's half of the federated LoRA-SB initialization, shared by
//! `fedsb join` and the browser participant.

use fedsb_engine::data::Example;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::GpuContext;
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::{ClassifierHead, LoraSbAdapters, Matrix};
use fedsb_engine::train::{gpu_init_gradients, init_batches, logit_sums, LabelledBatch};
use fedsb_protocol::{AdapterState, ClientMessage, TaskInfo, Tensor};

use crate::adapter_file::{parse_module_names, state_to_engine, ModuleRef};
use crate::ParticipantError;

/// The local initialization examples: the first `init_samples` of
/// `examples` in the order of the shuffle seeded by `seed` (as `fedsb init`
/// draws seed examples), in batches of `batch_size`; the same examples for
/// the initialization's gradients and for the centring of the head.
fn local_init_batches(
    tokenizer: &BertTokenizer,
    examples: &[Example],
    seed: u64,
    init_samples: u64,
    batch_size: u32,
) -> Result<(Vec<LabelledBatch>, usize), ParticipantError> {
    if init_samples == 0 || batch_size == 0 {
        return Err(ParticipantError::Invalid(format!(
            "the initialization request asks for {init_samples} samples in batches of {batch_size}"
        )));
    }
    if examples.is_empty() {
        return Err(ParticipantError::Invalid(
            "no local examples for the initialization".into(),
        ));
    }
    let wanted = usize::try_from(init_samples).unwrap_or(usize::MAX);
    Ok(init_batches(
        tokenizer,
        examples,
        batch_size as usize,
        seed,
        wanted,
    )?)
}

/// The summed gradients `Σ_batches ∂L_batch/∂W0` of every adapted module
/// (the task's `module_names` order), with the published head, over
/// `init_samples` of `examples` drawn as `fedsb init` draws seed examples (a
/// shuffle seeded by `seed`), in batches of `batch_size`. Returns them and
/// the number of examples used.
#[allow(clippy::too_many_arguments)]
pub async fn init_gradients(
    ctx: &GpuContext,
    task: &TaskInfo,
    weights: &BertWeights<f32>,
    tokenizer: &BertTokenizer,
    examples: &[Example],
    seed: u64,
    init_samples: u64,
    batch_size: u32,
    head_weight: Tensor,
    head_bias: Tensor,
) -> Result<(Vec<Tensor>, u64), ParticipantError> {
    let config = &weights.config;
    let (classes, hidden) = (task.labels.len(), config.hidden_size);
    if head_weight.shape != [classes as u32, hidden as u32] || head_bias.shape != [classes as u32] {
        return Err(ParticipantError::Invalid(format!(
            "the initialization head has shapes {:?} and {:?}, expected [{classes}, {hidden}] and [{classes}]",
            head_weight.shape, head_bias.shape
        )));
    }
    let head = ClassifierHead {
        weight: Matrix::from_vec(classes, hidden, head_weight.data),
        bias: head_bias.data,
    };
    let modules = parse_module_names(&task.module_names, config.num_hidden_layers)?;
    let (batches, taken) = local_init_batches(tokenizer, examples, seed, init_samples, batch_size)?;
    let grads = gpu_init_gradients(ctx, weights, &head, &batches).await?;
    let tensors = modules
        .iter()
        .map(|&(layer, which)| {
            let g = &grads[layer][which.index()];
            Tensor {
                shape: vec![g.rows as u32, g.cols as u32],
                data: g.data.clone(),
            }
        })
        .collect();
    Ok((tensors, taken as u64))
}

/// The frames that answer an `InitRequest`: one `InitGradient` per module
/// (in order), then `InitDone` with the number of examples.
pub fn init_frames(gradients: Vec<Tensor>, samples: u64) -> Vec<ClientMessage> {
    gradients
        .into_iter()
        .enumerate()
        .map(|(module, gradient)| ClientMessage::InitGradient {
            module: module as u32,
            gradient,
        })
        .chain(std::iter::once(ClientMessage::InitDone {
            num_samples: samples,
        }))
        .collect()
}

/// The answer to a `CentreRequest`: sets `adapter` (the initial `R`s and
/// head) on `encoder`, whose frozen A and B are `frozen` (a
/// [`crate::TaskModel`]'s), and sums each class's logits over the same
/// local initialization examples as [`init_gradients`] drew (`seed`,
/// `init_samples`, `batch_size`). The encoder's trainable state is replaced;
/// every round sets its own.
#[allow(clippy::too_many_arguments)]
pub async fn centre_logits(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    frozen: &LoraSbAdapters<f32>,
    modules: &[ModuleRef],
    examples: &[Example],
    seed: u64,
    init_samples: u64,
    batch_size: u32,
    adapter: &AdapterState,
) -> Result<ClientMessage, ParticipantError> {
    let (batches, _) = local_init_batches(tokenizer, examples, seed, init_samples, batch_size)?;
    let (adapters, head) = state_to_engine(frozen, modules, adapter)?;
    encoder.set_trainable(&adapters, &head)?;
    let (sums, samples) = logit_sums(encoder, &batches).await?;
    let data: Vec<f32> = sums.iter().map(|&s| s as f32).collect();
    if let Some(s) = data.iter().find(|s| !s.is_finite()) {
        return Err(ParticipantError::Invalid(format!(
            "the initial model's logits sum to {s} over the local initialization examples"
        )));
    }
    Ok(ClientMessage::CentreLogits {
        logit_sums: Tensor {
            shape: vec![data.len() as u32],
            data,
        },
        num_samples: samples,
    })
}
