//! The LoRA-SB adapter file that `fedsb init` writes and `fedsb join` reads,
//! and the conversions between the wire's [`AdapterState`] (one `R` per
//! module in the task's `module_names` order, then the head) and the engine's
//! per-layer [`LoraSbAdapters`].
//!
//! File layout (safetensors, every tensor F32), for every adapted module in
//! the aggregator's naming `encoder.layer.<i>.<module>`:
//!
//! | tensor | shape |
//! |---|---|
//! | `<name>.lora_A` | `[r, in]` (frozen) |
//! | `<name>.lora_B` | `[out, r]` (frozen) |
//! | `<name>.lora_R` | `[r, r]` (`R₀ = diag(S)`, round 0) |
//! | `classifier.weight` | `[classes, hidden]` (round 0 head) |
//! | `classifier.bias` | `[classes]` |
//!
//! The aggregator reads `lora_R` and `classifier.*` for round 0
//! (`files::initial_adapter`); participants read `lora_A` and `lora_B`.
//!
//! The header's metadata records what the file is (`rank`, `labels`, …)
//! and, under [`BASE_MODEL_SHA256`], the base model it was made for: `A`
//! and `B` come from that model's gradients and every `R` was trained on
//! its weights, so on another checkpoint of the same architecture (same
//! shapes) the file silently means nothing. [`check_base_model`] refuses
//! that.

use std::collections::HashMap;
use std::path::Path;

use fedsb_engine::model::{AdaptedLinear, BertConfig};
use fedsb_engine::reference::{
    ClassifierHead, LoraSbAdapters, LoraSbModule, Matrix, TrainableGradients,
};
use fedsb_protocol::{AdapterState, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Why an adapter file, a module name or a state conversion was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdapterFileError {
    /// The input is wrong; the message names what and where.
    #[error("{0}")]
    Invalid(String),
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, AdapterFileError>;

fn invalid(message: impl Into<String>) -> AdapterFileError {
    AdapterFileError::Invalid(message.into())
}

/// One adapted module: its encoder layer and which linear.
pub type ModuleRef = (usize, AdaptedLinear);

/// `encoder.layer.<i>.<module>` → (layer, linear), checked against the
/// model's number of layers.
pub fn parse_module_name(name: &str, num_layers: usize) -> Result<ModuleRef> {
    let rest = name.strip_prefix("encoder.layer.").ok_or_else(|| {
        invalid(format!(
            "module {name:?} is not of the form encoder.layer.<i>.<module>"
        ))
    })?;
    let (layer, module) = rest.split_once('.').ok_or_else(|| {
        invalid(format!(
            "module {name:?} is not of the form encoder.layer.<i>.<module>"
        ))
    })?;
    let layer: usize = layer
        .parse()
        .map_err(|_| invalid(format!("module {name:?}: layer {layer:?} is not a number")))?;
    if layer >= num_layers {
        return Err(invalid(format!(
            "module {name:?}: the model has only {num_layers} layers"
        )));
    }
    let which = parse_linear(module)?;
    Ok((layer, which))
}

/// A module path inside a layer (`attention.self.query`, …) → the engine's linear.
pub fn parse_linear(module: &str) -> Result<AdaptedLinear> {
    AdaptedLinear::ALL
        .into_iter()
        .find(|w| w.checkpoint_name() == module)
        .ok_or_else(|| {
            invalid(format!(
                "unknown module {module:?} (known: {})",
                AdaptedLinear::ALL.map(|w| w.checkpoint_name()).join(", ")
            ))
        })
}

/// Parses every name, refusing duplicates.
pub fn parse_module_names(names: &[String], num_layers: usize) -> Result<Vec<ModuleRef>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let m = parse_module_name(name, num_layers)?;
        if out.contains(&m) {
            return Err(invalid(format!("module {name:?} is listed twice")));
        }
        out.push(m);
    }
    Ok(out)
}

/// The adapted modules of a task from the per-layer module list (as in the
/// task's `[adapter] modules`): names `encoder.layer.<i>.<module>` and their
/// references, layer by layer and then in the listed order (the order of
/// `AdapterState::r`). A module listed twice is refused.
pub fn layered_modules(
    modules: &[String],
    num_layers: usize,
) -> Result<(Vec<String>, Vec<ModuleRef>)> {
    let mut linears = Vec::with_capacity(modules.len());
    for m in modules {
        let which = parse_linear(m)?;
        if linears.contains(&which) {
            return Err(invalid(format!("module {m:?} is listed twice")));
        }
        linears.push(which);
    }
    let mut names = Vec::with_capacity(num_layers * modules.len());
    let mut refs = Vec::with_capacity(num_layers * modules.len());
    for layer in 0..num_layers {
        for (m, &which) in modules.iter().zip(&linears) {
            names.push(format!("encoder.layer.{layer}.{m}"));
            refs.push((layer, which));
        }
    }
    Ok((names, refs))
}

/// The metadata key of the base model an adapter file was made for: the
/// lowercase hex SHA-256 of the bytes of the model directory's
/// `model.safetensors`. Files written before fedsb recorded it lack it.
pub const BASE_MODEL_SHA256: &str = "base_model_sha256";

/// The metadata key of the sequence length (in tokens, `[CLS]` and `[SEP]`
/// included) the file's model was made and evaluated at: the task's
/// `max_seq_len` for an exported round, the `--max-seq-len` of `fedsb
/// train`, `fedsb sim` or `fedsb init`. `fedsb eval` truncates at it unless
/// told otherwise, so that it reproduces the evaluation the file was made
/// with. Files written before fedsb recorded it lack it.
pub const MAX_SEQ_LEN: &str = "max_seq_len";

/// Refuses an adapter file whose metadata records ([`BASE_MODEL_SHA256`])
/// another base model than the one at hand, `model_file` with SHA-256
/// `model_sha256`; the message names `adapter`, `model_file` and both
/// hashes (abbreviated). A file without the key (from a fedsb that did not
/// record it) is accepted. Every command that reads an adapter file
/// together with a model calls this before using them together.
pub fn check_base_model(
    metadata: &HashMap<String, String>,
    adapter: &str,
    model_file: &str,
    model_sha256: &str,
) -> Result<()> {
    let Some(recorded) = metadata.get(BASE_MODEL_SHA256) else {
        tracing::debug!(
            adapter,
            "the adapter file records no base model ({BASE_MODEL_SHA256}): not checked"
        );
        return Ok(());
    };
    if recorded.trim().eq_ignore_ascii_case(model_sha256) {
        return Ok(());
    }
    Err(invalid(format!(
        "{adapter} was made for a base model whose model.safetensors has SHA-256 {} \
         (its {BASE_MODEL_SHA256} metadata), but {model_file} has {}; use the model it was \
         trained on",
        abbreviated(recorded),
        abbreviated(model_sha256)
    )))
}

/// The first 12 characters of a hash, with `…` when there were more.
fn abbreviated(sha256: &str) -> String {
    let mut short: String = sha256.trim().chars().take(12).collect();
    if sha256.trim().chars().count() > 12 {
        short.push('…');
    }
    short
}

/// An adapter file's header metadata (empty when it has none), read
/// without its tensors' values.
pub fn adapter_file_metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| invalid(format!("the adapter file is not valid safetensors: {e}")))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes the adapter file: `lora_A`, `lora_B`, `lora_R` of every module in
/// `names` (aggregator naming) and the head, with `metadata` in the header
/// ([`adapter_file_bytes`], written to a temporary file and renamed).
pub fn write_adapter_file(
    path: &Path,
    names: &[String],
    modules: &[ModuleRef],
    adapters: &LoraSbAdapters<f32>,
    head: &ClassifierHead<f32>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = adapter_file_bytes(names, modules, adapters, head, metadata)?;
    // A crash never leaves half a file that an aggregator would then serve.
    write_file_atomically(path, &bytes).map_err(|source| AdapterFileError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` so that nobody ever finds a half-written file
/// under its name: a temporary file beside it (named after it, this process
/// and this call, so two writers never share one), synced to disk, then
/// renamed over `path`. On an error the temporary file is removed and
/// `path` is as it was.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path names no file (it ends in .. or /)",
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}-{}.part",
        name.to_string_lossy(),
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The bytes of the adapter file [`write_adapter_file`] writes; equal
/// inputs give equal bytes.
pub fn adapter_file_bytes(
    names: &[String],
    modules: &[ModuleRef],
    adapters: &LoraSbAdapters<f32>,
    head: &ClassifierHead<f32>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, &(layer, which)) in names.iter().zip(modules) {
        let m = adapters
            .module(layer, which)
            .ok_or_else(|| invalid(format!("no adapter was initialized for {name}")))?;
        for (suffix, mat) in [("lora_A", &m.a), ("lora_B", &m.b), ("lora_R", &m.r)] {
            tensors.push((
                format!("{name}.{suffix}"),
                vec![mat.rows, mat.cols],
                f32_bytes(&mat.data),
            ));
        }
    }
    tensors.push((
        "classifier.weight".into(),
        vec![head.weight.rows, head.weight.cols],
        f32_bytes(&head.weight.data),
    ));
    tensors.push((
        "classifier.bias".into(),
        vec![head.bias.len()],
        f32_bytes(&head.bias),
    ));
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data)
                .map_err(|e| invalid(format!("tensor {name}: {e}")))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| invalid(format!("serializing the adapter file: {e}")))?;
    with_sorted_header(bytes)
}

/// safetensors writes the header's `__metadata__` from a `HashMap`, in an
/// order that changes from one run to the next, so equal adapters gave
/// files with different SHA-256s. This rewrites the header as the same JSON
/// with every object's keys sorted (padded with spaces to a multiple of 8
/// bytes, as safetensors pads it); the tensor data and their offsets, which
/// count from the end of the header, are unchanged.
pub fn with_sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let m: std::collections::BTreeMap<String, serde_json::Value> =
                    m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::Value::Object(m.into_iter().collect())
            }
            other => other,
        }
    }
    let bad = |what: &str| invalid(format!("serializing the adapter file: {what}"));
    let len: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("no header length"))?;
    let end = usize::try_from(u64::from_le_bytes(len))
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| bad("header length beyond the file"))?;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..end]).map_err(|e| bad(&e.to_string()))?;
    let mut json = serde_json::to_vec(&sorted(header)).map_err(|e| bad(&e.to_string()))?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - end);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

fn read_matrix(st: &SafeTensors<'_>, name: &str, rows: usize, cols: usize) -> Result<Matrix<f32>> {
    let data = crate::read_f32_tensor(st, name, &[rows, cols])
        .map_err(|e| invalid(format!("adapter file: {e}")))?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(invalid(format!(
            "adapter tensor {name} holds a non-finite value at index {i}"
        )));
    }
    Ok(Matrix::from_vec(rows, cols, data))
}

/// Reads the frozen `A`, `B` (and the file's `R₀`) of every module in `names`
/// from an adapter file, checking shapes against the model and the rank.
pub fn read_adapter_file(
    bytes: &[u8],
    names: &[String],
    modules: &[ModuleRef],
    config: &BertConfig,
    rank: usize,
) -> Result<LoraSbAdapters<f32>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| invalid(format!("the adapter file is not valid safetensors: {e}")))?;
    let mut adapters = LoraSbAdapters {
        layers: (0..config.num_hidden_layers)
            .map(|_| Default::default())
            .collect(),
    };
    for (name, &(layer, which)) in names.iter().zip(modules) {
        let (out, inp) = which.shape(config);
        let a = read_matrix(&st, &format!("{name}.lora_A"), rank, inp)?;
        let b = read_matrix(&st, &format!("{name}.lora_B"), out, rank)?;
        let r = read_matrix(&st, &format!("{name}.lora_R"), rank, rank)?;
        adapters.layers[layer][which.index()] = Some(LoraSbModule { a, b, r });
    }
    Ok(adapters)
}

/// What an adapter file holds besides its tensors' values, for a reader
/// that has no task configuration (`fedsb eval`): its adapted modules (the
/// `<name>.lora_R` tensors, in layer order and then the engine's linear
/// order), the rank, the head's classes (`classifier.weight`'s rows, if the
/// file has a head) and its header metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFileInfo {
    pub names: Vec<String>,
    pub modules: Vec<ModuleRef>,
    pub rank: usize,
    pub head_classes: Option<usize>,
    pub metadata: HashMap<String, String>,
}

/// Refuses class names a head cannot have: a blank name, or one named
/// twice (a label would then map to the first of them). The message says
/// which, by class index.
pub fn check_class_names(names: &[String]) -> std::result::Result<(), String> {
    for (i, name) in names.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(format!("class {i} has no name ({name:?})"));
        }
        if let Some(first) = names[..i].iter().position(|x| x == name) {
            return Err(format!(
                "the class {name:?} is named twice (classes {first} and {i})"
            ));
        }
    }
    Ok(())
}

impl AdapterFileInfo {
    /// The head's class names from the `labels` metadata (a JSON list), or
    /// `None` when the file has none; refused when they are not as many as
    /// the head's classes, or blank or named twice ([`check_class_names`]).
    pub fn labels(&self) -> Result<Option<Vec<String>>> {
        let labels: Option<Vec<String>> = self
            .metadata
            .get("labels")
            .map(|json| {
                serde_json::from_str(json).map_err(|_| {
                    invalid(format!(
                        "its labels metadata {json:?} is not a JSON list of names"
                    ))
                })
            })
            .transpose()?;
        if let Some(labels) = &labels {
            check_class_names(labels)
                .map_err(|e| invalid(format!("its labels metadata {labels:?}: {e}")))?;
        }
        if let (Some(labels), Some(classes)) = (&labels, self.head_classes) {
            if labels.len() != classes {
                return Err(invalid(format!(
                    "its labels metadata names {} classes ({}) but its head has {classes}",
                    labels.len(),
                    labels.join(", ")
                )));
            }
        }
        Ok(labels)
    }

    /// Every adapted module's `A`, `B` and `R` and the head of the file
    /// `bytes` this describes, checked against the model `config`; a file
    /// without a head is refused.
    pub fn read_model(
        &self,
        bytes: &[u8],
        config: &BertConfig,
    ) -> Result<(LoraSbAdapters<f32>, ClassifierHead<f32>)> {
        let classes = self
            .head_classes
            .ok_or_else(|| invalid("it has no classifier head (classifier.weight)"))?;
        let adapters = read_adapter_file(bytes, &self.names, &self.modules, config, self.rank)?;
        let head = read_head(bytes, classes, config.hidden_size)?
            .ok_or_else(|| invalid("it has no classifier head (classifier.weight)"))?;
        Ok((adapters, head))
    }
}

/// Reads an adapter file's [`AdapterFileInfo`], checking its module names
/// against a model of `num_layers` layers and that every R has one rank.
pub fn adapter_file_info(bytes: &[u8], num_layers: usize) -> Result<AdapterFileInfo> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| invalid(format!("the adapter file is not valid safetensors: {e}")))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| invalid(format!("the adapter file is not valid safetensors: {e}")))?;
    let mut found: Vec<(ModuleRef, String, Vec<usize>)> = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(module) = name.strip_suffix(".lora_R") {
            let m = parse_module_name(module, num_layers)?;
            found.push((m, module.to_owned(), view.shape().to_vec()));
        }
    }
    found.sort_by_key(|&((layer, which), _, _)| (layer, which.index()));
    let rank = match found.first() {
        None => return Err(invalid("the adapter file has no <module>.lora_R tensor")),
        Some((_, _, shape)) => match shape[..] {
            [rank, _] if rank > 0 => rank,
            _ => {
                return Err(invalid(format!(
                    "{}.lora_R has shape {shape:?}, expected [r, r] with a rank r of at least 1",
                    found[0].1
                )))
            }
        },
    };
    if let Some((_, name, shape)) = found.iter().find(|(_, _, s)| s[..] != [rank, rank]) {
        return Err(invalid(format!(
            "{name}.lora_R has shape {shape:?}, expected [{rank}, {rank}] like the first module's"
        )));
    }
    let head_classes = match st.tensor("classifier.weight") {
        Err(_) => None,
        Ok(v) => match v.shape() {
            &[classes, _] if classes > 0 => Some(classes),
            shape => {
                return Err(invalid(format!(
                    "classifier.weight has shape {shape:?}, expected [classes, hidden size]"
                )))
            }
        },
    };
    Ok(AdapterFileInfo {
        names: found.iter().map(|(_, n, _)| n.clone()).collect(),
        modules: found.iter().map(|(m, _, _)| *m).collect(),
        rank,
        head_classes,
        metadata: header.metadata().clone().unwrap_or_default(),
    })
}

/// The head an adapter file holds (`classifier.weight` `[classes, hidden]`
/// and `classifier.bias` `[classes]`), or `None` if it has none.
pub fn read_head(
    bytes: &[u8],
    classes: usize,
    hidden: usize,
) -> Result<Option<ClassifierHead<f32>>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| invalid(format!("the adapter file is not valid safetensors: {e}")))?;
    if st.tensor("classifier.weight").is_err() {
        return Ok(None);
    }
    let weight = read_matrix(&st, "classifier.weight", classes, hidden)?;
    let bias = crate::read_f32_tensor(&st, "classifier.bias", &[classes])
        .map_err(|e| invalid(format!("adapter file: {e}")))?;
    if let Some(i) = bias.iter().position(|x| !x.is_finite()) {
        return Err(invalid(format!(
            "adapter tensor classifier.bias holds a non-finite value at index {i}"
        )));
    }
    Ok(Some(ClassifierHead { weight, bias }))
}

/// The classifier head of a wire state.
pub fn head_from_state(state: &AdapterState) -> Result<ClassifierHead<f32>> {
    let [classes, hidden] = state.head_weight.shape[..] else {
        return Err(invalid(format!(
            "global head weight has shape {:?}",
            state.head_weight.shape
        )));
    };
    Ok(ClassifierHead {
        weight: Matrix::from_vec(
            classes as usize,
            hidden as usize,
            state.head_weight.data.clone(),
        ),
        bias: state.head_bias.data.clone(),
    })
}

/// The engine's adapters and head for a wire state: the `R`s of `state` (in
/// `modules` order) put into a copy of `frozen`.
pub fn state_to_engine(
    frozen: &LoraSbAdapters<f32>,
    modules: &[ModuleRef],
    state: &AdapterState,
) -> Result<(LoraSbAdapters<f32>, ClassifierHead<f32>)> {
    if state.r.len() != modules.len() {
        return Err(invalid(format!(
            "the global state has {} R matrices for {} modules",
            state.r.len(),
            modules.len()
        )));
    }
    let mut adapters = frozen.clone();
    for (t, &(layer, which)) in state.r.iter().zip(modules) {
        let m = adapters
            .module_mut(layer, which)
            .ok_or_else(|| invalid("module missing from the adapter file"))?;
        let r = m.rank();
        if t.shape != [r as u32, r as u32] {
            return Err(invalid(format!(
                "global R has shape {:?}, expected [{r}, {r}]",
                t.shape
            )));
        }
        m.r = Matrix::from_vec(r, r, t.data.clone());
    }
    let head = head_from_state(state)?;
    Ok((adapters, head))
}

/// The wire state of the engine's trained `R`s and head, `R`s in `modules` order.
pub fn engine_to_state(
    trained: &TrainableGradients<f32>,
    modules: &[ModuleRef],
) -> Result<AdapterState> {
    let tensor = |m: &Matrix<f32>| Tensor {
        shape: vec![m.rows as u32, m.cols as u32],
        data: m.data.clone(),
    };
    let r = modules
        .iter()
        .map(|&(layer, which)| {
            trained.r[layer][which.index()]
                .as_ref()
                .map(tensor)
                .ok_or_else(|| invalid(format!("no trained R for layer {layer} {which:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(AdapterState {
        r,
        head_weight: tensor(&trained.head_weight),
        head_bias: Tensor {
            shape: vec![trained.head_bias.len() as u32],
            data: trained.head_bias.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BERT config with hidden size 8 and `layers` layers.
    fn tiny_config(layers: usize) -> BertConfig {
        BertConfig {
            vocab_size: 20,
            hidden_size: 8,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            intermediate_size: 12,
            max_position_embeddings: 16,
            ..BertConfig::default()
        }
    }

    #[test]
    fn layered_modules_go_layer_by_layer_in_the_listed_order() {
        let listed = ["output.dense", "attention.self.query"].map(String::from);
        let (names, refs) = layered_modules(&listed, 2).unwrap();
        assert_eq!(
            names,
            [
                "encoder.layer.0.output.dense",
                "encoder.layer.0.attention.self.query",
                "encoder.layer.1.output.dense",
                "encoder.layer.1.attention.self.query",
            ]
        );
        assert_eq!(
            refs,
            [
                (0, AdaptedLinear::Output),
                (0, AdaptedLinear::Query),
                (1, AdaptedLinear::Output),
                (1, AdaptedLinear::Query),
            ]
        );
        let twice = ["output.dense", "output.dense"].map(String::from);
        let e = layered_modules(&twice, 2).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = layered_modules(&["attention.qkv".to_owned()], 2).unwrap_err();
        assert!(e.to_string().contains("unknown module"), "{e}");
    }

    #[test]
    fn module_names_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_module_name("encoder.layer.3.attention.output.dense", 6).unwrap(),
            (3, AdaptedLinear::AttentionOutput)
        );
        assert_eq!(
            parse_module_name("encoder.layer.0.output.dense", 1).unwrap(),
            (0, AdaptedLinear::Output)
        );
        let e = parse_module_name("encoder.layer.6.output.dense", 6).unwrap_err();
        assert!(e.to_string().contains("only 6 layers"), "{e}");
        let e = parse_module_name("encoder.layer.0.attention.self.qkv", 6).unwrap_err();
        assert!(e.to_string().contains("unknown module"), "{e}");
        assert!(parse_module_name("layer.0.output.dense", 6).is_err());
    }

    #[test]
    fn adapter_file_round_trips_and_state_conversions_invert() {
        let config = tiny_config(2);
        let adapters = LoraSbAdapters::<f32>::random(&config, 3, 7, 0.5);
        let head = ClassifierHead::<f32>::init(2, 8, 0.02, 1);
        // Task order differs from the engine's order on purpose.
        let names: Vec<String> = [
            "encoder.layer.1.output.dense",
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.intermediate.dense",
        ]
        .map(String::from)
        .to_vec();
        let modules = parse_module_names(&names, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter.safetensors");
        write_adapter_file(&path, &names, &modules, &adapters, &head, HashMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let back = read_adapter_file(&bytes, &names, &modules, &config, 3).unwrap();
        for &(l, w) in &modules {
            assert_eq!(back.module(l, w), adapters.module(l, w));
        }
        assert!(back.module(1, AdaptedLinear::Query).is_none());
        let e = read_adapter_file(&bytes, &names, &modules, &config, 4).unwrap_err();
        assert!(e.to_string().contains("expected [4, 12]"), "{e}");

        let mut state = AdapterState {
            r: modules
                .iter()
                .enumerate()
                .map(|(i, _)| Tensor {
                    shape: vec![3, 3],
                    data: (0..9).map(|j| (i * 10 + j) as f32).collect(),
                })
                .collect(),
            head_weight: Tensor {
                shape: vec![2, 8],
                data: vec![0.5; 16],
            },
            head_bias: Tensor {
                shape: vec![2],
                data: vec![1.0, -1.0],
            },
        };
        let (a, h) = state_to_engine(&back, &modules, &state).unwrap();
        assert_eq!(a.module(0, AdaptedLinear::Query).unwrap().r.data[4], 14.0);
        let trained = TrainableGradients {
            r: a.layers
                .iter()
                .map(|l| l.each_ref().map(|m| m.as_ref().map(|m| m.r.clone())))
                .collect(),
            head_weight: h.weight,
            head_bias: h.bias,
        };
        assert_eq!(engine_to_state(&trained, &modules).unwrap(), state);
        state.r.pop();
        assert!(state_to_engine(&back, &modules, &state).is_err());
    }

    /// A file read without a task: its modules in layer and then engine
    /// order, its rank, head and metadata; mixed ranks and a file without
    /// any R are refused.
    #[test]
    fn adapter_file_info_reads_modules_rank_and_head() {
        let config = tiny_config(2);
        let adapters = LoraSbAdapters::<f32>::random(&config, 3, 7, 0.5);
        let head = ClassifierHead::<f32>::init(2, 8, 0.02, 1);
        let names: Vec<String> = [
            "encoder.layer.1.output.dense",
            "encoder.layer.0.intermediate.dense",
            "encoder.layer.0.attention.self.query",
        ]
        .map(String::from)
        .to_vec();
        let modules = parse_module_names(&names, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter.safetensors");
        let metadata = HashMap::from([("labels".to_owned(), "[\"a\",\"b\"]".to_owned())]);
        write_adapter_file(&path, &names, &modules, &adapters, &head, metadata).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let info = adapter_file_info(&bytes, 2).unwrap();
        assert_eq!(
            info.names,
            [
                "encoder.layer.0.attention.self.query",
                "encoder.layer.0.intermediate.dense",
                "encoder.layer.1.output.dense",
            ]
        );
        assert_eq!(
            info.modules,
            [
                (0, AdaptedLinear::Query),
                (0, AdaptedLinear::Intermediate),
                (1, AdaptedLinear::Output),
            ]
        );
        assert_eq!((info.rank, info.head_classes), (3, Some(2)));
        assert_eq!(info.metadata["labels"], "[\"a\",\"b\"]");
        assert_eq!(read_head(&bytes, 2, 8).unwrap(), Some(head.clone()));
        let e = read_head(&bytes, 3, 8).unwrap_err();
        assert!(e.to_string().contains("classifier.weight"), "{e}");
        // A model with fewer layers than the file.
        let e = adapter_file_info(&bytes, 1).unwrap_err();
        assert!(e.to_string().contains("only 1 layers"), "{e}");

        // Two ranks in one file.
        let other = LoraSbAdapters::<f32>::random(&config, 4, 7, 0.5);
        let mut mixed = adapters.clone();
        mixed.layers[1][AdaptedLinear::Output.index()] =
            other.module(1, AdaptedLinear::Output).cloned();
        write_adapter_file(&path, &names, &modules, &mixed, &head, HashMap::new()).unwrap();
        let e = adapter_file_info(&std::fs::read(&path).unwrap(), 2).unwrap_err();
        assert!(
            e.to_string()
                .contains("encoder.layer.1.output.dense.lora_R has shape [4, 4], expected [3, 3]"),
            "{e}"
        );
        let e = adapter_file_info(b"not safetensors", 2).unwrap_err();
        assert!(e.to_string().contains("not valid safetensors"), "{e}");
    }

    /// A head's classes must have names, each its own: a label would
    /// otherwise map to the first of two equal names.
    #[test]
    fn blank_or_repeated_class_names_are_refused() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check_class_names(&names(&["neg", "pos"])).unwrap();
        let e = check_class_names(&names(&["0", "0"])).unwrap_err();
        assert_eq!(e, "the class \"0\" is named twice (classes 0 and 1)");
        let e = check_class_names(&names(&["0", " ", "1"])).unwrap_err();
        assert_eq!(e, "class 1 has no name (\" \")");

        let config = tiny_config(1);
        let adapters = LoraSbAdapters::<f32>::random(&config, 2, 7, 0.5);
        let names = vec!["encoder.layer.0.attention.self.query".to_owned()];
        let modules = parse_module_names(&names, 1).unwrap();
        for (labels, head, error) in [
            (r#"["0","0"]"#, 2, "is named twice"),
            (r#"["0","","1"]"#, 3, "class 1 has no name"),
        ] {
            let head = ClassifierHead::<f32>::init(head, 8, 0.02, 1);
            let metadata = HashMap::from([("labels".to_owned(), labels.to_owned())]);
            let bytes = adapter_file_bytes(&names, &modules, &adapters, &head, metadata).unwrap();
            let e = adapter_file_info(&bytes, 1).unwrap().labels().unwrap_err();
            assert!(
                e.to_string().contains("its labels metadata") && e.to_string().contains(error),
                "{labels}: {e}"
            );
        }
    }

    /// A file recording another base model is refused, naming the file, the
    /// model file and both hashes; the recorded one passes whatever its
    /// case, and a file recording none passes.
    #[test]
    fn an_adapter_file_for_another_base_model_is_refused() {
        let ours = "9f8e".repeat(16);
        let theirs = "1a2b".repeat(16);
        let recorded = |sha: &str| HashMap::from([(BASE_MODEL_SHA256.to_owned(), sha.to_owned())]);
        let e = check_base_model(
            &recorded(&theirs),
            "run.safetensors",
            "other/model.safetensors",
            &ours,
        )
        .unwrap_err()
        .to_string();
        for part in [
            "run.safetensors was made for a base model whose model.safetensors has SHA-256 \
             1a2b1a2b1a2b…",
            "but other/model.safetensors has 9f8e9f8e9f8e…",
            "use the model it was trained on",
        ] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
        check_base_model(&recorded(&ours), "a", "m", &ours).unwrap();
        check_base_model(&recorded(&ours.to_uppercase()), "a", "m", &ours).unwrap();
        check_base_model(&HashMap::new(), "a", "m", &ours).unwrap();

        // The key survives the file, and is read back without the tensors.
        let config = tiny_config(1);
        let adapters = LoraSbAdapters::<f32>::random(&config, 3, 7, 0.5);
        let head = ClassifierHead::<f32>::init(2, 8, 0.02, 1);
        let names = vec!["encoder.layer.0.output.dense".to_owned()];
        let modules = parse_module_names(&names, 1).unwrap();
        let bytes =
            adapter_file_bytes(&names, &modules, &adapters, &head, recorded(&theirs)).unwrap();
        let metadata = adapter_file_metadata(&bytes).unwrap();
        assert_eq!(metadata[BASE_MODEL_SHA256], theirs);
        assert_eq!(adapter_file_info(&bytes, 1).unwrap().metadata, metadata);
        assert!(check_base_model(&metadata, "a", "m", &ours).is_err());
        let e = adapter_file_metadata(b"not safetensors").unwrap_err();
        assert!(e.to_string().contains("not valid safetensors"), "{e}");
    }

    /// The same adapter and metadata give the same bytes, whatever order the
    /// metadata map iterates in (each `HashMap` has its own random order).
    #[test]
    fn equal_adapters_give_byte_identical_files() {
        let config = tiny_config(1);
        let adapters = LoraSbAdapters::<f32>::random(&config, 3, 7, 0.5);
        let head = ClassifierHead::<f32>::init(2, 8, 0.02, 1);
        let names = vec!["encoder.layer.0.attention.self.query".to_owned()];
        let modules = parse_module_names(&names, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |i: usize| {
            let metadata: HashMap<String, String> = [
                "format",
                "model",
                "rank",
                "init_samples",
                "lr",
                "seed",
                "task",
                "labels",
            ]
            .iter()
            .map(|k| (k.to_string(), format!("value of {k}")))
            .collect();
            let path = dir.path().join(format!("adapter-{i}.safetensors"));
            write_adapter_file(&path, &names, &modules, &adapters, &head, metadata).unwrap();
            std::fs::read(path).unwrap()
        };
        let first = write(0);
        for i in 1..8 {
            assert!(write(i) == first, "file {i} differs from file 0");
        }
        // Still a valid safetensors file with its metadata and tensors.
        let (n, meta) = SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(n % 8, 0);
        let md = meta.metadata().as_ref().unwrap();
        assert_eq!(md.len(), 8);
        assert_eq!(md["rank"], "value of rank");
        let back = read_adapter_file(&first, &names, &modules, &config, 3).unwrap();
        assert_eq!(
            back.module(0, AdaptedLinear::Query),
            adapters.module(0, AdaptedLinear::Query)
        );
    }
}
