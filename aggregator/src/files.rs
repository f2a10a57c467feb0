//! Files served to participants by content hash (model, tokenizer, adapter
//! matrices), the SHA-256 pins that keep a task on the files it started
//! with, the check that the adapter file was made for the served model
//! (its `base_model_sha256`), and the initial adapter state.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fedsb_protocol::{AdapterState, Tensor};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::adapter_file::{adapter_file_metadata, check_base_model};
use crate::config::Config;
use crate::store::PinnedFile;
use fedsb_engine::model::AdaptedLinear;

/// The served files whose SHA-256 a task's database pins: a committed
/// round's R only means something with the model's weights and the adapter
/// file's A and B it was trained on.
pub const PINNED_NAMES: [&str; 2] = [MODEL_FILE, ADAPTER_FILE];
/// The model's weights, as served.
pub const MODEL_FILE: &str = "model.safetensors";
/// The adapter file with A and B, as served.
pub const ADAPTER_FILE: &str = "adapter.safetensors";

/// Why a served file or the initial state could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Not a `#[source]`: the coordinator logs this by its message alone.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "model directory {dir} lacks {name} (run `cargo xtask fetch-model` for the default model)"
    )]
    MissingModelFile { dir: PathBuf, name: &'static str },
    #[error("model.safetensors has SHA-256 {found}, but model.sha256 in the configuration is {expected}")]
    HashMismatch { expected: String, found: String },
    #[error("adapter file {path}: {message}")]
    Adapter { path: PathBuf, message: String },
    /// The adapter file records another base model than the task's; the
    /// message names both files and hashes.
    #[error("{0}")]
    OtherBaseModel(String),
    #[error("file hashing task panicked")]
    Join,
    #[error(
        "{name} {path} has SHA-256 {found}, but this task's database pins {stored} \
         (the file it started with, then at {stored_path}): its committed rounds only mean \
         something with that file. Restore it, or start a new task for this file \
         (another [task] id or state directory)"
    )]
    PinnedChanged {
        name: String,
        path: PathBuf,
        stored: String,
        found: String,
        stored_path: PathBuf,
    },
    #[error(
        "this task's database pins {name} (SHA-256 {stored}, then at {stored_path}), but the \
         configuration has no {name}: its committed rounds only mean something with that \
         file. Restore the configuration ([model] dir, [adapter] file), or start a new task \
         (another [task] id or state directory)"
    )]
    PinnedMissing {
        name: String,
        stored: String,
        stored_path: PathBuf,
    },
}

/// A file's size and modification time, to notice that it changed on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub modified: Option<SystemTime>,
}

impl FileStamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        Ok(Self::from_metadata(&std::fs::metadata(path)?))
    }

    pub fn from_metadata(m: &std::fs::Metadata) -> Self {
        Self {
            size: m.len(),
            modified: m.modified().ok(),
        }
    }
}

/// A file available at `/files/<sha256>`.
#[derive(Debug, Clone)]
pub struct ServedFile {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// The SHA-256 (hex) and size of a file.
pub fn hash_file(path: &Path) -> Result<(String, u64), FileError> {
    hash_file_stamped(path).map(|(sha256, size, _)| (sha256, size))
}

/// [`hash_file`] with the file's stamp as it was when hashing began.
pub fn hash_file_stamped(path: &Path) -> Result<(String, u64, FileStamp), FileError> {
    let err = |error| FileError::Read {
        path: path.to_owned(),
        error,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let stamp = FileStamp::from_metadata(&f.metadata().map_err(err)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size, stamp))
}

/// Hashes the model directory's files and the adapter file; each with its
/// stamp from when it was hashed. An adapter file made for another base
/// model than the task's (its `base_model_sha256` against the hash of
/// `model.safetensors`, or `model.sha256` without a model directory) is
/// refused.
pub fn collect_files(config: &Config) -> Result<Vec<(ServedFile, FileStamp)>, FileError> {
    let mut out = Vec::new();
    if let Some(dir) = &config.model.dir {
        for name in ["config.json", "model.safetensors", "tokenizer.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(FileError::MissingModelFile {
                    dir: dir.clone(),
                    name,
                });
            }
            let (sha256, size, stamp) = hash_file_stamped(&path)?;
            if name == MODEL_FILE {
                if let Some(expected) = &config.model.sha256 {
                    if !expected.eq_ignore_ascii_case(&sha256) {
                        return Err(FileError::HashMismatch {
                            expected: expected.clone(),
                            found: sha256,
                        });
                    }
                }
            }
            out.push((
                ServedFile {
                    name: name.to_owned(),
                    path,
                    sha256,
                    size,
                },
                stamp,
            ));
        }
    }
    if let Some(path) = &config.adapter.file {
        let model = match out.iter().find(|(f, _)| f.name == MODEL_FILE) {
            Some((f, _)) => Some((f.path.display().to_string(), f.sha256.clone())),
            None => config.model.sha256.as_ref().map(|sha256| {
                (
                    "the model.safetensors of model.sha256 in the configuration".to_owned(),
                    sha256.to_ascii_lowercase(),
                )
            }),
        };
        if let Some((model_file, sha256)) = model {
            check_adapter_base_model(path, &model_file, &sha256)?;
        }
        out.push(served_adapter_file(path)?);
    }
    Ok(out)
}

/// Refuses the adapter file at `path` when its metadata records another
/// base model than `model_file`, whose SHA-256 is `sha256`.
pub fn check_adapter_base_model(
    path: &Path,
    model_file: &str,
    sha256: &str,
) -> Result<(), FileError> {
    let bytes = std::fs::read(path).map_err(|error| FileError::Read {
        path: path.to_owned(),
        error,
    })?;
    let metadata = adapter_file_metadata(&bytes).map_err(|e| FileError::Adapter {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    check_base_model(&metadata, &path.display().to_string(), model_file, sha256)
        .map_err(|e| FileError::OtherBaseModel(e.to_string()))
}

/// The adapter file at `path`, hashed, as it is served.
pub fn served_adapter_file(path: &Path) -> Result<(ServedFile, FileStamp), FileError> {
    let (sha256, size, stamp) = hash_file_stamped(path)?;
    Ok((
        ServedFile {
            name: ADAPTER_FILE.to_owned(),
            path: path.to_owned(),
            sha256,
            size,
        },
        stamp,
    ))
}

/// Checks the files found now against the database's pins: a pinned file
/// with another hash, or one no longer there, is refused. Returns the
/// pinnable files not pinned yet (all of them for a new task or a database
/// from before pins), for the caller to pin.
pub fn check_pins(
    pinned: &[PinnedFile],
    found: &[ServedFile],
) -> Result<Vec<PinnedFile>, FileError> {
    for p in pinned {
        match found.iter().find(|f| f.name == p.name) {
            Some(f) => check_pin(p, &f.path, &f.sha256)?,
            None => {
                return Err(FileError::PinnedMissing {
                    name: p.name.clone(),
                    stored: p.sha256.clone(),
                    stored_path: p.path.clone(),
                })
            }
        }
    }
    Ok(found
        .iter()
        .filter(|f| PINNED_NAMES.contains(&f.name.as_str()))
        .filter(|f| !pinned.iter().any(|p| p.name == f.name))
        .map(|f| PinnedFile {
            name: f.name.clone(),
            path: f.path.clone(),
            sha256: f.sha256.clone(),
        })
        .collect())
}

/// Whether the file at `path` with hash `sha256` is the pinned one.
pub fn check_pin(pinned: &PinnedFile, path: &Path, sha256: &str) -> Result<(), FileError> {
    if pinned.sha256.eq_ignore_ascii_case(sha256) {
        return Ok(());
    }
    Err(FileError::PinnedChanged {
        name: pinned.name.clone(),
        path: path.to_owned(),
        stored: pinned.sha256.clone(),
        found: sha256.to_owned(),
        stored_path: pinned.path.clone(),
    })
}

/// The values of the F32 tensor `name` of an adapter file, checked to have
/// `shape` (shared with the participants, which read A and B with it).
pub use fedsb_participant::read_f32_tensor;

/// The round-0 state: `<module>.lora_R` and `classifier.{weight,bias}` from
/// the adapter file when one is configured, otherwise zeros (R = 0 makes
/// every adapter a no-op until the first round).
pub fn initial_adapter(config: &Config) -> Result<AdapterState, FileError> {
    let shape = config.adapter_shape();
    let mut state = AdapterState::zeros(&shape);
    let Some(path) = &config.adapter.file else {
        return Ok(state);
    };
    let bytes = std::fs::read(path).map_err(|error| FileError::Read {
        path: path.clone(),
        error,
    })?;
    let bad = |message: String| FileError::Adapter {
        path: path.clone(),
        message,
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let load = |name: &str, target: &mut Tensor, required: bool| -> Result<(), FileError> {
        if !required && st.tensor(name).is_err() {
            return Ok(());
        }
        let shape: Vec<usize> = target.shape.iter().map(|&d| d as usize).collect();
        target.data = read_f32_tensor(&st, name, &shape).map_err(bad)?;
        Ok(())
    };
    for (name, r) in config.module_names().iter().zip(state.r.iter_mut()) {
        load(&format!("{name}.lora_R"), r, true)?;
        // With a model to serve, participants train with this file's A and B.
        if config.model.dir.is_some() {
            check_frozen(&st, name, config, shape.rank as usize).map_err(bad)?;
        }
    }
    load("classifier.weight", &mut state.head_weight, false)?;
    load("classifier.bias", &mut state.head_bias, false)?;
    state.validate(&shape).map_err(|e| bad(e.to_string()))?;
    Ok(state)
}

/// Refuses a module whose frozen `lora_A` or `lora_B` is missing or not
/// `[rank, in]` and `[out, rank]` (where the model's sizes are known): the
/// aggregator never reads them, but no participant could train without.
fn check_frozen(
    st: &SafeTensors<'_>,
    name: &str,
    config: &Config,
    rank: usize,
) -> Result<(), String> {
    let hidden = config.model.hidden_size.map(|h| h as usize);
    let inner = config.model.intermediate_size.map(|i| i as usize);
    let which = fedsb_participant::parse_module_name(name, usize::MAX)
        .map(|(_, which)| which)
        .map_err(|e| e.to_string())?;
    let (out, input) = match which {
        AdaptedLinear::Intermediate => (inner, hidden),
        AdaptedLinear::Output => (hidden, inner),
        _ => (hidden, hidden),
    };
    for (suffix, want) in [
        ("lora_A", [Some(rank), input]),
        ("lora_B", [out, Some(rank)]),
    ] {
        let tensor = format!("{name}.{suffix}");
        let view = st.tensor(&tensor).map_err(|_| {
            format!("it has no tensor {tensor}: participants need every module's A and B")
        })?;
        let shape = view.shape();
        let fits = shape.len() == 2
            && want
                .iter()
                .zip(shape)
                .all(|(w, &d)| w.is_none_or(|w| w == d));
        if !fits {
            let want: Vec<String> = want
                .iter()
                .map(|w| w.map_or("?".to_owned(), |w| w.to_string()))
                .collect();
            return Err(format!(
                "tensor {tensor} has shape {shape:?}, expected [{}]",
                want.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(name: &str, path: &str, sha256: &str) -> ServedFile {
        ServedFile {
            name: name.into(),
            path: PathBuf::from(path),
            sha256: sha256.into(),
            size: 1,
        }
    }

    fn pin(name: &str, path: &str, sha256: &str) -> PinnedFile {
        PinnedFile {
            name: name.into(),
            path: PathBuf::from(path),
            sha256: sha256.into(),
        }
    }

    /// A task's first start pins its model and adapter file (not the
    /// tokenizer or config.json); later starts pass with the same files,
    /// moved or not, and are refused with another one or without one.
    #[test]
    fn pins_refuse_another_or_a_missing_file_and_pin_new_ones() {
        let found = vec![
            served("config.json", "/m/config.json", "c1"),
            served(MODEL_FILE, "/m/model.safetensors", "m1"),
            served("tokenizer.json", "/m/tokenizer.json", "t1"),
            served(ADAPTER_FILE, "/a/adapter.safetensors", "a1"),
        ];
        assert_eq!(
            check_pins(&[], &found).unwrap(),
            vec![
                pin(MODEL_FILE, "/m/model.safetensors", "m1"),
                pin(ADAPTER_FILE, "/a/adapter.safetensors", "a1"),
            ]
        );
        let pinned = vec![
            pin(ADAPTER_FILE, "/old/adapter.safetensors", "a1"),
            pin(MODEL_FILE, "/m/model.safetensors", "m1"),
        ];
        assert!(check_pins(&pinned, &found).unwrap().is_empty());
        // Only the model pinned (a database from before the adapter file
        // was pinned): the adapter file is pinned now.
        assert_eq!(
            check_pins(&pinned[1..], &found).unwrap(),
            vec![pin(ADAPTER_FILE, "/a/adapter.safetensors", "a1")]
        );

        let mut other = found.clone();
        other[3].sha256 = "a2".into();
        let err = check_pins(&pinned, &other).unwrap_err();
        assert!(matches!(err, FileError::PinnedChanged { .. }), "{err:?}");
        let msg = err.to_string();
        for part in [
            "adapter.safetensors /a/adapter.safetensors has SHA-256 a2",
            "pins a1",
            "/old/adapter.safetensors",
            "Restore it, or start a new task",
        ] {
            assert!(msg.contains(part), "{part:?} not in {msg}");
        }

        let err = check_pins(&pinned, &found[..3]).unwrap_err();
        assert!(matches!(err, FileError::PinnedMissing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("pins adapter.safetensors (SHA-256 a1, then at /old/adapter.safetensors), but the configuration has no adapter.safetensors"),
            "{msg}"
        );
    }

    /// A task whose adapter file records another base model than its
    /// `model.safetensors` does not start, the message naming both files
    /// and hashes; the right one, or a file recording none, passes.
    #[test]
    fn an_adapter_file_for_another_base_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        crate::test_support::write_fake_model(dir.path());
        let adapter = dir.path().join(ADAPTER_FILE);
        let write_adapter = |base_model: Option<&[u8]>| {
            let data = 1f32.to_le_bytes();
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data)
                    .unwrap();
            let metadata = base_model.map(|b| {
                std::collections::HashMap::from([(
                    crate::adapter_file::BASE_MODEL_SHA256.to_owned(),
                    crate::store::sha256_hex(b),
                )])
            });
            std::fs::write(
                &adapter,
                safetensors::serialize([("x", view)], metadata).unwrap(),
            )
            .unwrap();
        };
        let toml = r#"[task]
id = "t"
rounds = 2
labels = ["a", "b"]
[model]
id = "m"
dir = "model"
[adapter]
rank = 4
file = "adapter.safetensors"
"#;
        std::fs::write(dir.path().join("task.toml"), toml).unwrap();
        write_adapter(Some(b"other weights"));
        let config = crate::config::load_locked(&dir.path().join("task.toml")).unwrap();

        let err = collect_files(&config).unwrap_err();
        assert!(matches!(err, FileError::OtherBaseModel(_)), "{err:?}");
        let msg = err.to_string();
        for part in [
            format!("{} was made for a base model", adapter.display()),
            crate::store::sha256_hex(b"other weights")[..12].to_owned(),
            format!(
                "but {} has {}",
                config
                    .model
                    .dir
                    .as_ref()
                    .unwrap()
                    .join(MODEL_FILE)
                    .display(),
                &crate::store::sha256_hex(b"weights")[..12]
            ),
        ] {
            assert!(msg.contains(&part), "{part:?} not in {msg}");
        }
        write_adapter(Some(b"weights"));
        assert_eq!(collect_files(&config).unwrap().len(), 4);
        write_adapter(None);
        assert_eq!(collect_files(&config).unwrap().len(), 4);
    }

    #[test]
    fn a_hashed_file_has_the_stamp_it_had_when_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let (sha256, size, stamp) = hash_file_stamped(&path).unwrap();
        assert_eq!(
            sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(size, 3);
        assert_eq!(FileStamp::of(&path).unwrap(), stamp);
        std::fs::write(&path, b"abcd").unwrap();
        assert_ne!(FileStamp::of(&path).unwrap(), stamp);
        let err = hash_file(&dir.path().join("missing")).unwrap_err();
        // The cause once, in the message.
        assert!(err.to_string().starts_with("cannot read "), "{err}");
        assert!(std::error::Error::source(&err).is_none());
    }
}
