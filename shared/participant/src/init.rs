//! The participant's half of the federated LoRA-SB initialization, shared by
//! `fedsb join` and the browser participant.

use fedsb_engine::data::Example;
use fedsb_engine::gpu::GpuContext;
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::{ClassifierHead, Matrix};
use fedsb_engine::train::{encode_examples, gpu_init_gradients, BatchSampler};
use fedsb_protocol::{ClientMessage, TaskInfo, Tensor};

use crate::adapter_file::parse_module_names;
use crate::ParticipantError;

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
    if init_samples == 0 || batch_size == 0 {
        return Err(ParticipantError::Invalid(format!(
            "the initialization request asks for {init_samples} samples in batches of {batch_size}"
        )));
    }
    let head = ClassifierHead {
        weight: Matrix::from_vec(classes, hidden, head_weight.data),
        bias: head_bias.data,
    };
    let modules = parse_module_names(&task.module_names, config.num_hidden_layers)?;
    let wanted = (init_samples.min(examples.len() as u64)) as usize;
    if wanted == 0 {
        return Err(ParticipantError::Invalid(
            "no local examples for the initialization".into(),
        ));
    }
    let mut sampler = BatchSampler::new(examples.len(), batch_size as usize, seed ^ 0x1417);
    let mut batches = Vec::new();
    let mut taken = 0;
    while taken < wanted {
        let idx = sampler.next_batch();
        let idx = &idx[..idx.len().min(wanted - taken)];
        taken += idx.len();
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        batches.push(encode_examples(tokenizer, &refs)?);
    }
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
