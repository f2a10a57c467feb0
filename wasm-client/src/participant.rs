//! The browser participant: [`WasmParticipant`] trains a task's LoRA-SB `R`s
//! and head on the worker's WebGPU device with the same procedure as `fedsb
//! join` ([`fedsb_participant::train_round`]) and hands back `Update` frames.
//! The WebSocket loop lives in `www/participant-worker.js`; the frames from
//! the aggregator are decoded here, so the worker never interprets tensors.
//!
//! ```js
//! const p = await WasmParticipant.create(welcomeFrame, config, model, tokenizer, adapter);
//! const preview = p.setData(text, "train.csv", null, null, null);
//! const r = await p.trainRound(globalModelFrame, roundOpenFrame); // r.frame: the Update frame
//! ```

use std::cell::{Cell, RefCell};

use fedsb_engine::data::{ColumnSpec, Dataset};
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::{ClassifierHead, Matrix};
use fedsb_engine::train::BatchSampler;
use fedsb_participant::{
    centre_logits, init_frames, init_gradients, read_task_data, task_adamw, train_round,
    train_round_dp, DpTraining, LocalOptimizer, ParticipantError, TaskModel,
};
use fedsb_privacy::AccountantKind;
use fedsb_protocol::{ClientMessage, ServerMessage, TaskInfo};
use serde::Serialize;
use wasm_bindgen::prelude::*;

/// Rows shown in a data preview.
const PREVIEW_ROWS: usize = 5;

fn error(message: impl std::fmt::Display) -> JsValue {
    JsError::new(&message.to_string()).into()
}

fn participant_error(e: ParticipantError) -> JsValue {
    error(e)
}

fn decode(frame: &[u8], what: &str) -> Result<ServerMessage, JsValue> {
    ServerMessage::decode(frame).map_err(|e| error(format!("cannot decode the {what} frame: {e}")))
}

/// The local data and its sampler, set by `setData`.
struct LocalData {
    data: Dataset,
    sampler: BatchSampler,
}

/// A participant of one task, on the worker's WebGPU device.
#[wasm_bindgen]
pub struct WasmParticipant {
    ctx: &'static GpuContext,
    /// `None` while a round trains: a second concurrent call is refused.
    encoder: RefCell<Option<GpuEncoder<'static>>>,
    model: TaskModel,
    task: TaskInfo,
    participant: u64,
    opt: AdamW,
    local: RefCell<Option<LocalData>>,
    /// DP tasks: σ calibrated for the local data and the ledger of what this
    /// participant has spent (set by `setData`; `None` while a round trains).
    dp: RefCell<Option<DpTraining>>,
    /// The seed of the batch shuffle and of the initialization's draw
    /// (`setSeed`), as `fedsb join --seed`; `None`: a fresh random shuffle
    /// for each `setData`, and seed 0 for the draw.
    seed: Cell<Option<u64>>,
}

impl std::fmt::Debug for WasmParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmParticipant")
            .field("task", &self.task.task_id)
            .field("participant", &self.participant)
            .finish_non_exhaustive()
    }
}

/// One trained round: the `Update` frame to send and what it took.
#[wasm_bindgen]
#[derive(Debug)]
pub struct RoundResult {
    frame: Vec<u8>,
    round: u64,
    samples: u64,
    mean_loss: f32,
    seconds: f64,
    /// DP tasks: ε spent after this round and the budget ε.
    epsilon_spent: Option<f64>,
    epsilon_budget: Option<f64>,
}

#[wasm_bindgen]
impl RoundResult {
    /// DP tasks: ε spent by this participant after this round (`undefined`
    /// without DP).
    #[wasm_bindgen(getter, js_name = epsilonSpent)]
    pub fn epsilon_spent(&self) -> Option<f64> {
        self.epsilon_spent
    }
    /// DP tasks: the budget ε (`undefined` without DP).
    #[wasm_bindgen(getter, js_name = epsilonBudget)]
    pub fn epsilon_budget(&self) -> Option<f64> {
        self.epsilon_budget
    }
    /// The encoded `Update` frame (a `Uint8Array`).
    #[wasm_bindgen(getter)]
    pub fn frame(&self) -> Vec<u8> {
        self.frame.clone()
    }
    #[wasm_bindgen(getter)]
    pub fn round(&self) -> f64 {
        self.round as f64
    }
    /// Examples trained on this round: the update's aggregation weight.
    #[wasm_bindgen(getter)]
    pub fn samples(&self) -> f64 {
        self.samples as f64
    }
    /// Sample-weighted mean training loss of the round.
    #[wasm_bindgen(getter, js_name = meanLoss)]
    pub fn mean_loss(&self) -> f32 {
        self.mean_loss
    }
    /// Wall time of the round's training (steps and read-back).
    #[wasm_bindgen(getter)]
    pub fn seconds(&self) -> f64 {
        self.seconds
    }
    #[wasm_bindgen(getter, js_name = samplesPerSecond)]
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.seconds.max(1e-9)
    }
}

#[derive(Serialize)]
struct PrivacyStatus {
    epsilon_spent: f64,
    epsilon_budget: f64,
    delta: f64,
    noise_multiplier: f64,
    sample_rate: f64,
    clip_norm: f64,
    steps_taken: u64,
    planned_steps: u64,
}

#[derive(Serialize)]
struct PreviewRow<'a> {
    text: &'a str,
    text_pair: Option<&'a str>,
    label: Option<&'a str>,
}

#[derive(Serialize)]
struct Preview<'a> {
    rows: usize,
    text_column: &'a str,
    text_pair_column: Option<&'a str>,
    label_column: Option<&'a str>,
    /// `[class name, count]` in class order.
    label_counts: Vec<(&'a str, usize)>,
    /// Rows skipped for having no label (empty, -1 or -), and the first's line.
    skipped_rows: usize,
    first_skipped_line: Option<u64>,
    first_rows: Vec<PreviewRow<'a>>,
    /// Labels read as class ids: which id is which class (as `fedsb join`
    /// says), or `None`.
    class_ids_note: Option<String>,
}

fn read_local(
    text: &str,
    file_name: &str,
    text_column: Option<String>,
    text_pair_column: Option<String>,
    label_column: Option<String>,
    labels: &[String],
) -> Result<Dataset, JsValue> {
    let nonempty = |c: Option<String>| c.filter(|s| !s.trim().is_empty());
    let columns = ColumnSpec {
        text: nonempty(text_column),
        text_pair: nonempty(text_pair_column),
        label: nonempty(label_column),
        ..ColumnSpec::default()
    };
    read_task_data(text.as_bytes(), file_name, columns, labels).map_err(participant_error)
}

fn preview(data: &Dataset) -> Result<JsValue, JsValue> {
    let preview = Preview {
        rows: data.len(),
        text_column: &data.text_column,
        text_pair_column: data.text_pair_column.as_deref(),
        label_column: data.label_column.as_deref(),
        label_counts: data
            .label_names
            .iter()
            .map(String::as_str)
            .zip(data.class_counts())
            .collect(),
        skipped_rows: data.skipped.count,
        first_skipped_line: data.skipped.first_line,
        class_ids_note: data.class_ids_note(),
        first_rows: data
            .examples
            .iter()
            .take(PREVIEW_ROWS)
            .map(|e| PreviewRow {
                text: &e.text,
                text_pair: e.text_pair.as_deref(),
                label: e.label.map(|l| data.label_names[l as usize].as_str()),
            })
            .collect(),
    };
    serde_wasm_bindgen::to_value(&preview).map_err(error)
}

/// Reads local data as [`WasmParticipant::set_data`] will, with the task's
/// class names `labels` (e.g. from `/api/task`), before joining: `{rows,
/// text_column, text_pair_column, label_column, label_counts: [[name,
/// count]], first_rows: [{text, text_pair, label}], class_ids_note}`. Errors name the line
/// and column.
#[wasm_bindgen(js_name = previewData)]
pub fn preview_data(
    text: &str,
    file_name: &str,
    text_column: Option<String>,
    text_pair_column: Option<String>,
    label_column: Option<String>,
    labels: Vec<String>,
) -> Result<JsValue, JsValue> {
    let data = read_local(
        text,
        file_name,
        text_column,
        text_pair_column,
        label_column,
        &labels,
    )?;
    preview(&data)
}

/// The participant's half of a federated LoRA-SB initialization (a task
/// with `[adapter] init = "federated"`, whose `Welcome` lists no adapter
/// file): decodes the `Welcome` and the `InitRequest`, reads the local data
/// as `setData` does, computes on its own WebGPU device the summed gradients
/// of every adapted module over the first `init_samples` examples (the
/// shuffle seeded by `seed`, default 0, as `fedsb join --seed` draws them)
/// with the published head, and resolves to the frames to send, in order:
/// one `InitGradient` per module, then `InitDone`. Then wait for
/// `AdapterReady`, fetch that file and `WasmParticipant.create` with it.
#[allow(clippy::too_many_arguments)]
#[wasm_bindgen(js_name = federatedInitFrames)]
pub async fn federated_init_frames(
    welcome_frame: Vec<u8>,
    init_request_frame: Vec<u8>,
    config_json: Vec<u8>,
    model_safetensors: Vec<u8>,
    tokenizer_json: Vec<u8>,
    text: String,
    file_name: String,
    text_column: Option<String>,
    text_pair_column: Option<String>,
    label_column: Option<String>,
    seed: Option<u64>,
) -> Result<js_sys::Array, JsValue> {
    let task = match decode(&welcome_frame, "Welcome")? {
        ServerMessage::Welcome { task, .. } => task,
        other => return Err(error(format!("expected a Welcome frame, got {other:?}"))),
    };
    let (init_samples, batch_size, head_weight, head_bias) =
        match decode(&init_request_frame, "InitRequest")? {
            ServerMessage::InitRequest {
                init_samples,
                batch_size,
                head_weight,
                head_bias,
            } => (init_samples, batch_size, head_weight, head_bias),
            other => {
                return Err(error(format!(
                    "expected an InitRequest frame, got {other:?}"
                )))
            }
        };
    let data = read_local(
        &text,
        &file_name,
        text_column,
        text_pair_column,
        label_column,
        &task.labels,
    )?;
    let weights = BertWeights::from_bytes(&config_json, &model_safetensors)
        .map_err(|e| error(format!("cannot load the task's model: {e}")))?;
    let tokenizer = BertTokenizer::from_bytes(&tokenizer_json)
        .and_then(|t| t.with_max_length(task.max_seq_len as usize))
        .map_err(|e| error(format!("cannot load the task's tokenizer: {e}")))?;
    let ctx = GpuContext::new(&GpuOptions::default())
        .await
        .map_err(|e| error(format!("WebGPU: {e}")))?;
    let result = init_gradients(
        &ctx,
        &task,
        &weights,
        &tokenizer,
        &data.examples,
        seed.unwrap_or(0),
        init_samples,
        batch_size,
        head_weight,
        head_bias,
    )
    .await;
    // Frees the initialization's GPU buffers at once.
    ctx.device.destroy();
    let (gradients, samples) = result.map_err(participant_error)?;
    let frames = js_sys::Array::new();
    for message in init_frames(gradients, samples) {
        frames.push(&js_sys::Uint8Array::from(message.encode().as_slice()));
    }
    Ok(frames)
}

#[wasm_bindgen]
impl WasmParticipant {
    /// Decodes the `Welcome` frame, parses the task's files (checked against
    /// the task's shapes), requests the WebGPU device and uploads the model
    /// with the frozen adapters. Tasks with differential privacy train with
    /// DP-SGD once `setData` has calibrated σ for the local data.
    pub async fn create(
        welcome_frame: Vec<u8>,
        config_json: Vec<u8>,
        model_safetensors: Vec<u8>,
        tokenizer_json: Vec<u8>,
        adapter_safetensors: Vec<u8>,
    ) -> Result<WasmParticipant, JsValue> {
        let (participant, task) = match decode(&welcome_frame, "Welcome")? {
            ServerMessage::Welcome {
                participant, task, ..
            } => (participant.0, task),
            other => return Err(error(format!("expected a Welcome frame, got {other:?}"))),
        };
        let model = TaskModel::load(
            &task,
            &config_json,
            &model_safetensors,
            &tokenizer_json,
            &adapter_safetensors,
        )
        .map_err(participant_error)?;
        let ctx: &'static GpuContext = Box::leak(Box::new(
            GpuContext::new(&GpuOptions::default())
                .await
                .map_err(|e| error(format!("WebGPU: {e}")))?,
        ));
        let zero_head = ClassifierHead {
            weight: Matrix::zeros(task.labels.len(), model.weights.config.hidden_size),
            bias: vec![0.0; task.labels.len()],
        };
        let encoder = GpuEncoder::new(ctx, &model.weights, Some(&model.frozen), Some(&zero_head))
            .map_err(|e| {
            ctx.device.destroy();
            error(format!("WebGPU: uploading the model: {e}"))
        })?;
        let opt = task_adamw(&task).map_err(|e| {
            ctx.device.destroy();
            participant_error(e)
        })?;
        Ok(Self {
            ctx,
            encoder: RefCell::new(Some(encoder)),
            model,
            task,
            participant,
            opt,
            local: RefCell::new(None),
            dp: RefCell::new(None),
            seed: Cell::new(None),
        })
    }

    /// The WebGPU adapter as wgpu reports it ([`crate::describe_adapter`]).
    #[wasm_bindgen(js_name = adapterName)]
    pub fn adapter_name(&self) -> String {
        crate::describe_adapter(self.ctx.adapter_info())
    }

    /// The id the aggregator gave this participant.
    #[wasm_bindgen(getter)]
    pub fn participant(&self) -> f64 {
        self.participant as f64
    }

    /// The head's learning rate as a multiple of each round's announced
    /// rate (the task's `head_learning_rate / learning_rate`; 1 when the
    /// task does not set it): what this tab's AdamW trains the head at.
    #[wasm_bindgen(getter, js_name = headLearningRateScale)]
    pub fn head_learning_rate_scale(&self) -> f32 {
        self.opt.head_lr_scale
    }

    #[wasm_bindgen(getter, js_name = taskId)]
    pub fn task_id(&self) -> String {
        self.task.task_id.clone()
    }

    /// The task's class names, in head order.
    #[wasm_bindgen(getter)]
    pub fn labels(&self) -> Vec<String> {
        self.task.labels.clone()
    }

    /// Reads the local data (CSV, TSV or JSONL by `fileName`'s extension)
    /// with the task's classes; columns not named (`null` or empty) are
    /// detected from the header. Replaces any earlier data. Returns the
    /// preview of [`preview_data`].
    #[wasm_bindgen(js_name = setData)]
    pub fn set_data(
        &self,
        text: &str,
        file_name: &str,
        text_column: Option<String>,
        text_pair_column: Option<String>,
        label_column: Option<String>,
    ) -> Result<JsValue, JsValue> {
        let data = read_local(
            text,
            file_name,
            text_column,
            text_pair_column,
            label_column,
            &self.task.labels,
        )?;
        let value = preview(&data)?;
        if let Some(policy) = &self.task.privacy {
            if self.encoder.borrow().is_none() {
                return Err(error(
                    "a DP round is training; set the data after it (its steps are not recorded yet)",
                ));
            }
            // σ for every step this participant may take: all the task's
            // rounds × local steps at q = batch / N (as `fedsb join` does
            // without --dp-rounds), with the PLD accountant (its default).
            let planned = self
                .task
                .total_rounds
                .saturating_mul(u64::from(self.task.local_steps));
            let mut dp = DpTraining::calibrate(
                policy,
                data.len(),
                self.task.batch_size as usize,
                planned,
                AccountantKind::Pld,
            )
            .map_err(|e| {
                error(format!(
                    "task {} uses differential privacy (ε = {}, δ = {}, C = {}): {e}",
                    self.task.task_id, policy.epsilon, policy.delta, policy.clip_norm
                ))
            })?;
            let earlier = self.dp.borrow_mut().take();
            if let Some(earlier) = earlier {
                // New data replaces the old, but what was spent stays spent.
                dp.merge_ledger(earlier.ledger())
                    .map_err(participant_error)?;
            }
            self.dp.replace(Some(dp));
        }
        // A fresh seed per data set unless one was set: the shuffle need not
        // be reproducible for a volunteer.
        let seed = self
            .seed
            .get()
            .unwrap_or_else(|| (js_sys::Math::random() * 9_007_199_254_740_992.0) as u64);
        let sampler = BatchSampler::new(data.len(), self.task.batch_size as usize, seed);
        self.local.replace(Some(LocalData { data, sampler }));
        Ok(value)
    }

    /// Seeds the batch shuffle of the next `setData` with `seed`, as `fedsb
    /// join --seed` does, so that a tab's batch order can be reproduced (the
    /// page's `?seed=N`), and `centreFrame`'s draw of the initialization's
    /// examples (pass the same seed to `federatedInitFrames`). Without it
    /// each `setData` draws a random seed, and the initialization's draw
    /// uses seed 0.
    #[wasm_bindgen(js_name = setSeed)]
    pub fn set_seed(&self, seed: u64) {
        self.seed.set(Some(seed));
    }

    /// DP tasks: the privacy ledger (JSON) of the steps taken so far, to keep
    /// across reloads; `undefined` without DP or before `setData`.
    #[wasm_bindgen(js_name = ledgerJson)]
    pub fn ledger_json(&self) -> Option<String> {
        self.dp.borrow().as_ref().map(DpTraining::ledger_json)
    }

    /// DP tasks: adds the steps of a ledger saved by `ledgerJson` (an
    /// earlier session on the same data) to what this participant has spent.
    /// Call after `setData`. A corrupt ledger is an error, never ignored.
    #[wasm_bindgen(js_name = restoreLedger)]
    pub fn restore_ledger(&self, json: &str) -> Result<(), JsValue> {
        let mut dp = self.dp.borrow_mut();
        let dp = dp
            .as_mut()
            .ok_or_else(|| error("no privacy ledger: the task has no DP, or setData was not called (or a round is training)"))?;
        dp.merge_ledger_json(json, "saved in this browser")
            .map_err(participant_error)
    }

    /// DP tasks: `{epsilon_spent, epsilon_budget, delta, noise_multiplier,
    /// sample_rate, clip_norm, steps_taken, planned_steps}`; `null` without
    /// DP or before `setData`.
    pub fn privacy(&self) -> Result<JsValue, JsValue> {
        let dp = self.dp.borrow();
        let Some(dp) = dp.as_ref() else {
            return Ok(JsValue::NULL);
        };
        let value = PrivacyStatus {
            epsilon_spent: dp.epsilon_spent().map_err(participant_error)?,
            epsilon_budget: dp.epsilon_budget(),
            delta: dp.delta(),
            noise_multiplier: dp.config.noise_multiplier,
            sample_rate: dp.config.sample_rate,
            clip_norm: dp.config.clip_norm,
            steps_taken: dp.steps_taken(),
            planned_steps: dp.planned_steps,
        };
        value
            .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
            .map_err(error)
    }

    /// Answers a `CentreRequest` frame (a task with `[adapter] centre_head`):
    /// the `CentreLogits` frame with the per-class sums of the initial
    /// model's logits over the same local examples the initialization's
    /// gradients used (the first `init_samples` of the shuffle seeded by
    /// `setSeed`'s seed, default 0, as `federatedInitFrames` draws them), on
    /// this tab's WebGPU device.
    #[wasm_bindgen(js_name = centreFrame)]
    pub async fn centre_frame(&self, centre_request_frame: Vec<u8>) -> Result<Vec<u8>, JsValue> {
        let (init_samples, batch_size, adapter) =
            match decode(&centre_request_frame, "CentreRequest")? {
                ServerMessage::CentreRequest {
                    init_samples,
                    batch_size,
                    adapter,
                } => (init_samples, batch_size, adapter),
                other => {
                    return Err(error(format!(
                        "expected a CentreRequest frame, got {other:?}"
                    )))
                }
            };
        adapter
            .validate(&self.task.shape)
            .map_err(|e| error(format!("the initial state does not fit the task: {e}")))?;
        let local = self
            .local
            .take()
            .ok_or_else(|| error("no local data: choose a file (setData) first"))?;
        let Some(mut encoder) = self.encoder.take() else {
            self.local.replace(Some(local));
            return Err(error("a round is training; await it first"));
        };
        let result = centre_logits(
            &mut encoder,
            &self.model.tokenizer,
            &self.model.frozen,
            &self.model.modules,
            &local.data.examples,
            self.seed.get().unwrap_or(0),
            init_samples,
            batch_size,
            &adapter,
        )
        .await;
        self.encoder.replace(Some(encoder));
        if self.local.borrow().is_none() {
            self.local.replace(Some(local));
        }
        Ok(result.map_err(participant_error)?.encode())
    }

    /// Trains the round that `roundOpenFrame` opens from the global state of
    /// `globalModelFrame` (the latest `GlobalModel`) on the local data, and
    /// resolves to the `Update` frame and the round's statistics.
    #[wasm_bindgen(js_name = trainRound)]
    pub async fn train_round(
        &self,
        global_model_frame: Vec<u8>,
        round_open_frame: Vec<u8>,
    ) -> Result<RoundResult, JsValue> {
        let global = match decode(&global_model_frame, "GlobalModel")? {
            ServerMessage::GlobalModel { round, adapter, .. } => {
                adapter.validate(&self.task.shape).map_err(|e| {
                    error(format!(
                        "the global state of round {round} does not fit the task: {e}"
                    ))
                })?;
                adapter
            }
            other => {
                return Err(error(format!(
                    "expected a GlobalModel frame, got {other:?}"
                )))
            }
        };
        let (round, steps, lr) = match decode(&round_open_frame, "RoundOpen")? {
            ServerMessage::RoundOpen {
                round,
                local_steps,
                learning_rate,
                ..
            } => (
                round,
                if local_steps > 0 {
                    local_steps
                } else {
                    self.task.local_steps
                },
                learning_rate,
            ),
            other => return Err(error(format!("expected a RoundOpen frame, got {other:?}"))),
        };
        // A tab resets its AdamW moments at the start of every round; the
        // round's learning rate is the one its RoundOpen announced.
        let mut opt = LocalOptimizer::new(self.opt, false);
        opt.set_learning_rate(lr).map_err(participant_error)?;
        let mut local = self
            .local
            .take()
            .ok_or_else(|| error("no local data: choose a file (setData) before training"))?;
        let Some(mut encoder) = self.encoder.take() else {
            self.local.replace(Some(local));
            return Err(error("a round is already training; await it first"));
        };
        let mut dp = self.dp.take();
        if self.task.privacy.is_some() && dp.is_none() {
            self.encoder.replace(Some(encoder));
            self.local.replace(Some(local));
            return Err(error("no DP calibration: call setData before training"));
        }
        if let Some(d) = &dp {
            // The budget first: a round that would exceed it is not trained.
            let refusal = match d.check(u64::from(steps)) {
                Ok(c) if c.within_budget => None,
                Ok(c) => Some(error(d.exhausted_message(&c, round, steps))),
                Err(e) => Some(participant_error(e)),
            };
            if let Some(e) = refusal {
                self.dp.replace(dp);
                self.encoder.replace(Some(encoder));
                self.local.replace(Some(local));
                return Err(e);
            }
        }
        let started = js_sys::Date::now();

        let result = match dp.as_mut() {
            Some(d) => train_round_dp(
                &mut encoder,
                &self.model.tokenizer,
                &self.model.frozen,
                &self.model.modules,
                &local.data.examples,
                d,
                &global,
                steps,
                &mut opt,
                round,
            )
            .await
            .map(|(r, report, _)| (r, Some(report))),
            None => train_round(
                &mut encoder,
                &self.model.tokenizer,
                &self.model.frozen,
                &self.model.modules,
                &local.data.examples,
                &mut local.sampler,
                &global,
                steps,
                &mut opt,
                round,
            )
            .await
            .map(|r| (r, None)),
        };
        let seconds = (js_sys::Date::now() - started) / 1000.0;
        self.encoder.replace(Some(encoder));
        let epsilon_budget = dp.as_ref().map(DpTraining::epsilon_budget);
        // Steps taken are spent, whether or not the round succeeded.
        self.dp.replace(dp);
        // setData may have replaced the data meanwhile; keep the newer.
        if self.local.borrow().is_none() {
            self.local.replace(Some(local));
        }
        let (trained, report) = result.map_err(participant_error)?;
        let epsilon_spent = report.as_ref().map(|r| r.epsilon_spent);
        let (samples, mean_loss) = (trained.samples, trained.mean_loss);
        let frame = ClientMessage::Update(trained.into_update(round, report)).encode();
        Ok(RoundResult {
            frame,
            round: round.0,
            samples,
            mean_loss,
            seconds,
            epsilon_spent,
            epsilon_budget,
        })
    }
}

impl Drop for WasmParticipant {
    fn drop(&mut self) {
        // Frees every GPU buffer of this participant at once.
        self.ctx.device.destroy();
    }
}
