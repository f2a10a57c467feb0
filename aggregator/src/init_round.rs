//! Federated LoRA-SB initialization (`[adapter] init = "federated"`): before
//! round 1 every participant sends `G_i = Σ_batches ∂L/∂W0` of each adapted
//! module over its first `init_samples` examples, computed with the head the
//! aggregator published in `InitRequest`. The aggregator sums them in f64
//! ([`InitCollector`]), then computes `ΔW = −η·sign(ΣG_i)` and the truncated
//! SVD exactly as `fedsb init` does ([`build_adapter_file`]), writes the
//! adapter file (recording the task's base model, `base_model_sha256`, as
//! `fedsb init` does) and serves it by hash.
//!
//! A participant's gradients are kept aside until its `InitDone`, and only
//! then added to the sum: a participant that sends a bad frame, leaves, or
//! never finishes changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use fedsb_engine::model::{AdaptedLinear, BertConfig};
use fedsb_engine::reference::{ClassifierHead, LoraSbAdapters, LoraSbInitOptions, Matrix};
use fedsb_engine::train::lora_sb_from_gradients;
use fedsb_protocol::{ErrorCode, ParticipantId, Tensor, MAX_UPDATE_ABS};

use crate::adapter_file::{
    parse_module_name, write_adapter_file, ModuleRef, BASE_MODEL_SHA256, MAX_SEQ_LEN,
};
use crate::config::Config;
use crate::files::ServedFile;
use crate::round::Rejection;
use crate::store::sha256_hex;

/// The files served at `/files/<sha256>`, by hash; the federated
/// initialization adds the adapter file while the server runs.
pub type SharedFiles = std::sync::Arc<std::sync::RwLock<HashMap<String, ServedFile>>>;

/// SHA-256 (lowercase hex) and size of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let bytes = std::fs::read(path)?;
    Ok((sha256_hex(&bytes), bytes.len() as u64))
}

/// Why the federated initialization could not produce an adapter file.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("reading the model's config.json: {0}")]
    Model(String),
    #[error("{0}")]
    Adapter(#[from] crate::adapter_file::AdapterFileError),
    #[error("LoRA-SB initialization: {0}")]
    Train(#[from] fedsb_engine::train::TrainError),
    #[error("hashing the model's weights: {0}")]
    Hash(String),
}

/// The SHA-256 of the task's base model, which the adapter file records:
/// `[model] sha256` (checked against the file at start) or the hash of
/// `model.safetensors` in `[model] dir`; `None` without either.
fn base_model_sha256(config: &Config) -> Result<Option<String>, InitError> {
    if let Some(sha256) = &config.model.sha256 {
        return Ok(Some(sha256.to_ascii_lowercase()));
    }
    let Some(dir) = &config.model.dir else {
        return Ok(None);
    };
    let (sha256, _) = crate::files::hash_file(&dir.join(crate::files::MODEL_FILE))
        .map_err(|e| InitError::Hash(e.to_string()))?;
    Ok(Some(sha256))
}

/// The task's adapted modules with their gradient shapes (`out × in`).
#[derive(Debug, Clone)]
pub struct InitModules {
    pub names: Vec<String>,
    pub modules: Vec<ModuleRef>,
    pub shapes: Vec<[u32; 2]>,
    pub config: BertConfig,
}

impl InitModules {
    /// Reads `config.json` of `[model] dir`.
    pub fn from_config(config: &Config) -> Result<Self, InitError> {
        let dir = config
            .model
            .dir
            .as_ref()
            .ok_or_else(|| InitError::Model("model.dir is not set".into()))?;
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| InitError::Model(format!("{}: {e}", path.display())))?;
        let bert = BertConfig::from_json(&bytes).map_err(|e| InitError::Model(e.to_string()))?;
        Self::new(bert, config.module_names())
    }

    /// The modules `names` (`encoder.layer.<i>.<linear>`) of a model with
    /// `bert`'s shapes.
    pub fn new(bert: BertConfig, names: Vec<String>) -> Result<Self, InitError> {
        let modules = names
            .iter()
            .map(|n| parse_module_name(n, bert.num_hidden_layers))
            .collect::<Result<Vec<_>, _>>()?;
        let shapes = modules
            .iter()
            .map(|&(_, which)| {
                let (out, inp) = which.shape(&bert);
                [out as u32, inp as u32]
            })
            .collect();
        Ok(Self {
            names,
            modules,
            shapes,
            config: bert,
        })
    }

    /// The initial classification head, as `fedsb init --seed` makes it.
    pub fn head(&self, classes: usize, seed: u64) -> ClassifierHead<f32> {
        ClassifierHead::<f32>::init(
            classes,
            self.config.hidden_size,
            self.config.initializer_range,
            seed ^ 0x5eed,
        )
    }
}

/// Collects and sums the participants' initialization gradients.
#[derive(Debug)]
pub struct InitCollector {
    shapes: Vec<[u32; 2]>,
    max_samples: u64,
    /// The most participants whose gradients are held or summed at once
    /// (the task's `max_participants`, where the initialization ends).
    max_participants: usize,
    sum: Vec<Vec<f64>>,
    pending: HashMap<ParticipantId, Vec<Option<Tensor>>>,
    done: BTreeMap<ParticipantId, u64>,
    bytes_in: u64,
}

impl InitCollector {
    /// `max_samples` is the task's `init_samples`: participants sum the
    /// gradients of at most that many of their first examples.
    /// `max_participants` caps the participants whose gradients are held
    /// (until their `InitDone`) or summed: each holds one f32 per adapted
    /// weight (42 MB for all-MiniLM-L6-v2), so the cap bounds the memory a
    /// crowd of participants that never finish could take.
    pub fn new(shapes: Vec<[u32; 2]>, max_samples: u64, max_participants: usize) -> Self {
        let sum = shapes
            .iter()
            .map(|s| vec![0.0; s[0] as usize * s[1] as usize])
            .collect();
        Self {
            shapes,
            max_samples,
            max_participants,
            sum,
            pending: HashMap::new(),
            done: BTreeMap::new(),
            bytes_in: 0,
        }
    }

    /// Participants whose gradients are in the sum.
    pub fn contributors(&self) -> usize {
        self.done.len()
    }

    /// Whether `p`'s gradients are in the sum.
    pub fn has(&self, p: ParticipantId) -> bool {
        self.done.contains_key(&p)
    }

    /// The examples `p`'s accepted gradients were summed over, if they are in.
    pub fn samples_of(&self, p: ParticipantId) -> Option<u64> {
        self.done.get(&p).copied()
    }

    /// Examples summed over.
    pub fn total_samples(&self) -> u64 {
        self.done.values().sum()
    }

    /// Bytes of accepted gradient frames.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// One module's gradient from `p`; kept aside until its `InitDone`.
    pub fn gradient(
        &mut self,
        p: ParticipantId,
        module: u32,
        gradient: Tensor,
        frame_bytes: u64,
    ) -> Result<(), Rejection> {
        if self.done.contains_key(&p) {
            return Err(Rejection::new(
                ErrorCode::DuplicateUpdate,
                "this participant's initialization gradients are already in",
            ));
        }
        let Some(shape) = self.shapes.get(module as usize) else {
            return Err(Rejection::new(
                ErrorCode::ShapeMismatch,
                format!(
                    "init gradient for module {module}, but the task adapts {} modules",
                    self.shapes.len()
                ),
            ));
        };
        if gradient.shape != shape[..] {
            return Err(Rejection::new(
                ErrorCode::ShapeMismatch,
                format!(
                    "init gradient of module {module} has shape {:?}, expected {:?}",
                    gradient.shape, shape
                ),
            ));
        }
        if let Some((i, v)) = gradient
            .data
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(Rejection::new(
                ErrorCode::NonFinite,
                format!("init gradient of module {module} holds {v} at index {i}"),
            ));
        }
        if !self.pending.contains_key(&p)
            && self.pending.len() + self.done.len() >= self.max_participants
        {
            return Err(Rejection::new(
                ErrorCode::RoundFull,
                format!(
                    "the initialization already takes the gradients of {} participants (the \
                     task's max_participants); this one trains in the rounds after it",
                    self.max_participants
                ),
            ));
        }
        let n = self.shapes.len();
        let slots = self.pending.entry(p).or_insert_with(|| vec![None; n]);
        let slot = &mut slots[module as usize];
        if slot.is_some() {
            return Err(Rejection::new(
                ErrorCode::DuplicateUpdate,
                format!("a second init gradient for module {module}"),
            ));
        }
        *slot = Some(gradient);
        self.bytes_in += frame_bytes;
        Ok(())
    }

    /// `p` has sent every module: its gradients join the sum. Without every
    /// module (or with `num_samples` = 0) everything it sent is dropped.
    pub fn finish_participant(
        &mut self,
        p: ParticipantId,
        num_samples: u64,
    ) -> Result<u64, Rejection> {
        if self.done.contains_key(&p) {
            return Err(Rejection::new(
                ErrorCode::DuplicateUpdate,
                "this participant's initialization gradients are already in",
            ));
        }
        let slots = self.pending.remove(&p).unwrap_or_default();
        if num_samples == 0 {
            return Err(Rejection::new(
                ErrorCode::InvalidSampleCount,
                "InitDone with num_samples = 0; the gradients sent are dropped",
            ));
        }
        if num_samples > self.max_samples {
            return Err(Rejection::new(
                ErrorCode::InvalidSampleCount,
                format!(
                    "InitDone with num_samples = {num_samples}, more than the task's init_samples ({}); \
                     the gradients sent are dropped",
                    self.max_samples
                ),
            ));
        }
        let missing: Vec<usize> = (0..self.shapes.len())
            .filter(|&i| slots.get(i).is_none_or(|s| s.is_none()))
            .collect();
        if !missing.is_empty() {
            return Err(Rejection::new(
                ErrorCode::NotInitializing,
                format!(
                    "InitDone without the gradients of modules {missing:?}; the gradients sent are dropped"
                ),
            ));
        }
        for (sum, g) in self.sum.iter_mut().zip(slots.into_iter().flatten()) {
            for (s, &x) in sum.iter_mut().zip(&g.data) {
                *s += f64::from(x);
            }
        }
        self.done.insert(p, num_samples);
        Ok(num_samples)
    }

    /// `p` left: drop what it sent without finishing.
    pub fn leave(&mut self, p: ParticipantId) {
        self.pending.remove(&p);
    }

    /// `ΔW = −η·sign(ΣG_i)` and its truncated SVD to `rank` per module: A,
    /// B and R₀, exactly as `fedsb init` computes them from pooled gradients.
    pub fn adapters(
        &self,
        modules: &InitModules,
        rank: usize,
        learning_rate: f64,
    ) -> Result<LoraSbAdapters<f32>, InitError> {
        let mut linears: Vec<AdaptedLinear> = Vec::new();
        for &(_, which) in &modules.modules {
            if !linears.contains(&which) {
                linears.push(which);
            }
        }
        let mut options = LoraSbInitOptions::new(rank, learning_rate);
        options.modules = linears;
        let grads = self.sign_gradients(modules);
        Ok(lora_sb_from_gradients(&modules.config, &grads, &options)?)
    }

    /// The sign of every summed gradient, as the engine's per-layer matrices
    /// (only the sign of G enters `ΔW = −η·sign(G)`, so this is exact even
    /// where the f64 sum is too small for f32).
    fn sign_gradients(&self, modules: &InitModules) -> Vec<[Matrix<f32>; 6]> {
        let mut layers: Vec<[Matrix<f32>; 6]> = (0..modules.config.num_hidden_layers)
            .map(|_| std::array::from_fn(|_| Matrix::from_vec(0, 0, Vec::new())))
            .collect();
        for ((sum, &(layer, which)), shape) in
            self.sum.iter().zip(&modules.modules).zip(&self.shapes)
        {
            let data = sum
                .iter()
                .map(|&x| {
                    if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            layers[layer][which.index()] =
                Matrix::from_vec(shape[0] as usize, shape[1] as usize, data);
        }
        layers
    }
}

/// Collects the participants' per-class logit sums under the initial model
/// (`[adapter] centre_head`) and centres the head's bias with them.
#[derive(Debug)]
pub struct CentreCollector {
    classes: usize,
    max_samples: u64,
    sums: Vec<f64>,
    done: BTreeMap<ParticipantId, u64>,
    bytes_in: u64,
}

impl CentreCollector {
    /// `max_samples` is the task's `init_samples`.
    pub fn new(classes: usize, max_samples: u64) -> Self {
        Self {
            classes,
            max_samples,
            sums: vec![0.0; classes],
            done: BTreeMap::new(),
            bytes_in: 0,
        }
    }

    /// Participants whose sums are in.
    pub fn contributors(&self) -> usize {
        self.done.len()
    }

    /// The examples `p`'s accepted sums cover, if they are in.
    pub fn samples_of(&self, p: ParticipantId) -> Option<u64> {
        self.done.get(&p).copied()
    }

    /// Examples the sums cover.
    pub fn total_samples(&self) -> u64 {
        self.done.values().sum()
    }

    /// Bytes of accepted frames.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// `p`'s logit sums over `num_samples` examples; refused (and nothing
    /// added) when they do not fit the task or `p`'s are in already.
    pub fn add(
        &mut self,
        p: ParticipantId,
        logit_sums: &Tensor,
        num_samples: u64,
        frame_bytes: u64,
    ) -> Result<u64, Rejection> {
        if self.done.contains_key(&p) {
            return Err(Rejection::new(
                ErrorCode::DuplicateUpdate,
                "this participant's logit sums are already in",
            ));
        }
        if logit_sums.shape != [self.classes as u32] {
            return Err(Rejection::new(
                ErrorCode::ShapeMismatch,
                format!(
                    "logit sums of shape {:?}, expected [{}] (one per class)",
                    logit_sums.shape, self.classes
                ),
            ));
        }
        if let Some((i, v)) = logit_sums
            .data
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(Rejection::new(
                ErrorCode::NonFinite,
                format!("the logit sum of class {i} is {v}"),
            ));
        }
        if num_samples == 0 || num_samples > self.max_samples {
            return Err(Rejection::new(
                ErrorCode::InvalidSampleCount,
                format!(
                    "CentreLogits with num_samples = {num_samples}; it must be in 1..={} \
                     (the task's init_samples)",
                    self.max_samples
                ),
            ));
        }
        // The initial model's logits are about ±1; a mean beyond the bound
        // updates have would shift the initial head's bias out of any
        // trainable range (and every round after it to NaN).
        let bound = f64::from(MAX_UPDATE_ABS) * num_samples as f64;
        if let Some((i, v)) = logit_sums
            .data
            .iter()
            .enumerate()
            .find(|(_, v)| f64::from(v.abs()) > bound)
        {
            return Err(Rejection::new(
                ErrorCode::NonFinite,
                format!(
                    "the logit sum of class {i} is {v:e} over {num_samples} samples, a mean \
                     logit beyond ±{MAX_UPDATE_ABS:e}"
                ),
            ));
        }
        for (s, &x) in self.sums.iter_mut().zip(&logit_sums.data) {
            *s += f64::from(x);
        }
        self.done.insert(p, num_samples);
        self.bytes_in += frame_bytes;
        Ok(num_samples)
    }

    /// Shifts `bias` so that every class has the same mean logit over all
    /// the samples reported; returns the means before.
    pub fn centre(&self, bias: &mut [f32]) -> Result<Vec<f64>, fedsb_engine::train::TrainError> {
        fedsb_engine::train::centre_bias(bias, &self.sums, self.total_samples())
    }
}

/// `ΔW = −η·sign(G)`, the truncated SVD per module (`A`, `B`, `R₀`) and the
/// head, written atomically to `path` as the adapter file `fedsb init` writes
/// (with the task's base model, when it has one).
pub fn build_adapter_file(
    config: &Config,
    modules: &InitModules,
    collector: &InitCollector,
    head: &ClassifierHead<f32>,
    path: &Path,
) -> Result<(), InitError> {
    let adapters = collector.adapters(
        modules,
        config.adapter.rank as usize,
        config.init_learning_rate(),
    )?;
    let mut metadata = HashMap::from([
        ("format".to_owned(), "fedsb-lora-sb".to_owned()),
        ("rank".to_owned(), config.adapter.rank.to_string()),
        ("modules".to_owned(), config.adapter.modules.join(",")),
        (
            "labels".to_owned(),
            serde_json::to_string(&config.task.labels).unwrap_or_default(),
        ),
        (
            "init_samples".to_owned(),
            collector.total_samples().to_string(),
        ),
        (
            "learning_rate".to_owned(),
            config.init_learning_rate().to_string(),
        ),
        ("seed".to_owned(), config.adapter.init_seed.to_string()),
        (MAX_SEQ_LEN.to_owned(), config.task.max_seq_len.to_string()),
        ("init".to_owned(), "federated".to_owned()),
        (
            "participants".to_owned(),
            collector.contributors().to_string(),
        ),
        (
            "head".to_owned(),
            "uniform(std = initializer_range) weight, zero bias".to_owned(),
        ),
    ]);
    if let Some(sha256) = base_model_sha256(config)? {
        metadata.insert(BASE_MODEL_SHA256.to_owned(), sha256);
    }
    write_adapter_file(
        path,
        &modules.names,
        &modules.modules,
        &adapters,
        head,
        metadata,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[u32], v: f32) -> Tensor {
        let n: u32 = shape.iter().product();
        Tensor::new(shape.to_vec(), vec![v; n as usize]).unwrap()
    }

    #[test]
    fn gradients_count_only_after_init_done_and_bad_ones_change_nothing() {
        let mut c = InitCollector::new(vec![[2, 3], [3, 2]], 16, 10);
        let (a, b) = (ParticipantId(1), ParticipantId(2));
        // Wrong shape, unknown module, non-finite: typed errors.
        let e = c.gradient(a, 0, t(&[3, 2], 1.0), 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::ShapeMismatch);
        let e = c.gradient(a, 2, t(&[2, 3], 1.0), 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::ShapeMismatch);
        let mut nan = t(&[2, 3], 1.0);
        nan.data[4] = f32::NAN;
        assert_eq!(
            c.gradient(a, 0, nan, 10).unwrap_err().code,
            ErrorCode::NonFinite
        );
        // Incomplete: InitDone is refused and the module sent is dropped.
        c.gradient(b, 0, t(&[2, 3], 100.0), 10).unwrap();
        assert_eq!(
            c.gradient(b, 0, t(&[2, 3], 100.0), 10).unwrap_err().code,
            ErrorCode::DuplicateUpdate
        );
        assert_eq!(
            c.finish_participant(b, 5).unwrap_err().code,
            ErrorCode::NotInitializing
        );
        assert_eq!(c.contributors(), 0);
        // Honest participant.
        c.gradient(a, 0, t(&[2, 3], -1.5), 10).unwrap();
        c.gradient(a, 1, t(&[3, 2], 2.0), 10).unwrap();
        assert_eq!(c.finish_participant(a, 7).unwrap(), 7);
        assert_eq!(
            c.finish_participant(a, 7).unwrap_err().code,
            ErrorCode::DuplicateUpdate
        );
        assert_eq!(
            c.gradient(a, 0, t(&[2, 3], 1.0), 10).unwrap_err().code,
            ErrorCode::DuplicateUpdate
        );
        assert_eq!(c.contributors(), 1);
        assert_eq!(c.total_samples(), 7);
        assert!(c.sum[0].iter().all(|&x| x == -1.5));
        assert!(c.sum[1].iter().all(|&x| x == 2.0));
        // A second one adds up; a zero sample count is refused.
        c.gradient(b, 0, t(&[2, 3], 1.0), 10).unwrap();
        c.gradient(b, 1, t(&[3, 2], 1.0), 10).unwrap();
        assert_eq!(
            c.finish_participant(b, 0).unwrap_err().code,
            ErrorCode::InvalidSampleCount
        );
        // More examples than the task's init_samples (16): refused, dropped.
        c.gradient(b, 0, t(&[2, 3], 1.0), 10).unwrap();
        c.gradient(b, 1, t(&[3, 2], 1.0), 10).unwrap();
        let e = c.finish_participant(b, 17).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidSampleCount);
        assert!(e.message.contains("init_samples (16)"), "{}", e.message);
        assert_eq!((c.contributors(), c.total_samples()), (1, 7));
        c.gradient(b, 0, t(&[2, 3], 1.0), 10).unwrap();
        c.gradient(b, 1, t(&[3, 2], 1.0), 10).unwrap();
        c.finish_participant(b, 3).unwrap();
        assert!(c.sum[0].iter().all(|&x| x == -0.5));
        assert!(c.sum[1].iter().all(|&x| x == 3.0));
        assert_eq!(c.total_samples(), 10);
    }

    /// At most `max_participants` participants' gradients are held or
    /// summed: one more is refused (`RoundFull`) until a held one leaves.
    #[test]
    fn gradients_are_held_for_at_most_max_participants() {
        let mut c = InitCollector::new(vec![[2, 3]], 16, 2);
        let (a, b, z) = (ParticipantId(1), ParticipantId(2), ParticipantId(3));
        c.gradient(a, 0, t(&[2, 3], 1.0), 10).unwrap();
        c.finish_participant(a, 4).unwrap();
        // b is held (no InitDone yet): z is one too many.
        let b_grad = t(&[2, 3], 1.0);
        c.gradient(b, 0, b_grad, 10).unwrap();
        let e = c.gradient(z, 0, t(&[2, 3], 1.0), 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::RoundFull);
        assert!(e.message.contains("max_participants"), "{}", e.message);
        assert_eq!(c.bytes_in(), 20);
        // Once b leaves, z's gradients are taken.
        c.leave(b);
        c.gradient(z, 0, t(&[2, 3], 2.0), 10).unwrap();
        c.finish_participant(z, 4).unwrap();
        assert_eq!(c.contributors(), 2);
        assert!(c.sum[0].iter().all(|&x| x == 3.0));
    }

    /// The federated initialization's file records the task's model:
    /// `[model] sha256` when set, else the hash of its model.safetensors,
    /// and nothing without a model.
    #[test]
    fn the_base_model_is_the_tasks() {
        let dir = tempfile::tempdir().unwrap();
        crate::test_support::write_fake_model(dir.path());
        let load = |model_section: &str| {
            let toml = format!(
                "[task]\nid = \"t\"\nrounds = 2\nlabels = [\"a\", \"b\"]\n\
                 [model]\nid = \"m\"\n{model_section}\n[adapter]\nrank = 4\n"
            );
            std::fs::write(dir.path().join("task.toml"), toml).unwrap();
            crate::config::load_locked(&dir.path().join("task.toml")).unwrap()
        };
        let config = load("dir = \"model\"");
        assert_eq!(
            base_model_sha256(&config).unwrap(),
            Some(sha256_hex(b"weights"))
        );
        let pinned = "AB".repeat(32);
        let config = load(&format!("dir = \"model\"\nsha256 = \"{pinned}\""));
        assert_eq!(
            base_model_sha256(&config).unwrap(),
            Some(pinned.to_ascii_lowercase())
        );
        let config = load("hidden_size = 8\nnum_layers = 2");
        assert_eq!(base_model_sha256(&config).unwrap(), None);
    }

    #[test]
    fn logit_sums_add_up_and_bad_ones_change_nothing() {
        let mut c = CentreCollector::new(2, 64);
        let (a, b, z) = (ParticipantId(1), ParticipantId(2), ParticipantId(3));
        let sums = |x: f32, y: f32| Tensor::new(vec![2], vec![x, y]).unwrap();
        let e = c
            .add(a, &Tensor::new(vec![3], vec![0.0; 3]).unwrap(), 8, 10)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::ShapeMismatch);
        let e = c.add(a, &sums(f32::INFINITY, 0.0), 8, 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::NonFinite);
        assert_eq!(
            c.add(a, &sums(1.0, 1.0), 0, 10).unwrap_err().code,
            ErrorCode::InvalidSampleCount
        );
        let e = c.add(a, &sums(1.0, 1.0), 65, 10).unwrap_err();
        assert!(e.message.contains("1..=64"), "{}", e.message);
        // Finite, but a mean logit no initial model gives.
        let e = c.add(a, &sums(3e38, 0.0), 8, 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::NonFinite, "{}", e.message);
        assert!(e.message.contains("class 0"), "{}", e.message);
        assert_eq!((c.contributors(), c.bytes_in()), (0, 0));
        // Nothing in: centring is refused and leaves the bias alone.
        let mut bias = vec![0.5f32, -0.5];
        assert!(c.centre(&mut bias).is_err());
        assert_eq!(bias, [0.5, -0.5]);
        // Means over the pooled samples: (−30 − 10) / 40 = −1 and
        // (50 + 30) / 40 = 2; their average 0.5.
        assert_eq!(c.add(a, &sums(-30.0, 50.0), 30, 10).unwrap(), 30);
        assert_eq!(
            c.add(a, &sums(0.0, 0.0), 1, 10).unwrap_err().code,
            ErrorCode::DuplicateUpdate
        );
        c.add(b, &sums(-10.0, 30.0), 10, 10).unwrap();
        assert_eq!(c.samples_of(b), Some(10));
        assert_eq!(c.samples_of(z), None);
        assert_eq!(
            (c.contributors(), c.total_samples(), c.bytes_in()),
            (2, 40, 20)
        );
        let means = c.centre(&mut bias).unwrap();
        assert_eq!(means, [-1.0, 2.0]);
        // −1 − 0.5 = −1.5 and 2 − 0.5 = 1.5 taken off: equal means, same sum.
        assert_eq!(bias, [2.0, -2.0]);
    }
}
