//! Files served to participants by content hash (model, tokenizer, adapter
//! matrices), and the initial adapter state.

use std::io::Read;
use std::path::{Path, PathBuf};

use fedsb_protocol::{AdapterState, Tensor};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::config::Config;

/// Why a served file or the initial state could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "model directory {dir} lacks {name} (run `cargo xtask fetch-model` for the default model)"
    )]
    MissingModelFile { dir: PathBuf, name: &'static str },
    #[error("model.safetensors has SHA-256 {found}, but model.sha256 in the configuration is {expected}")]
    HashMismatch { expected: String, found: String },
    #[error("adapter file {path}: {message}")]
    Adapter { path: PathBuf, message: String },
    #[error("file hashing task panicked")]
    Join,
}

/// A file available at `/files/<sha256>`.
#[derive(Debug, Clone)]
pub struct ServedFile {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

fn hash_file(path: &Path) -> Result<(String, u64), FileError> {
    let err = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
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
    Ok((hex::encode(hasher.finalize()), size))
}

/// Hashes the model directory's files and the adapter file.
pub fn collect_files(config: &Config) -> Result<Vec<ServedFile>, FileError> {
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
            let (sha256, size) = hash_file(&path)?;
            if name == "model.safetensors" {
                if let Some(expected) = &config.model.sha256 {
                    if !expected.eq_ignore_ascii_case(&sha256) {
                        return Err(FileError::HashMismatch {
                            expected: expected.clone(),
                            found: sha256,
                        });
                    }
                }
            }
            out.push(ServedFile {
                name: name.to_owned(),
                path,
                sha256,
                size,
            });
        }
    }
    if let Some(path) = &config.adapter.file {
        let (sha256, size) = hash_file(path)?;
        out.push(ServedFile {
            name: "adapter.safetensors".to_owned(),
            path: path.clone(),
            sha256,
            size,
        });
    }
    Ok(out)
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
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.clone(),
        source,
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
    }
    load("classifier.weight", &mut state.head_weight, false)?;
    load("classifier.bias", &mut state.head_bias, false)?;
    state.validate(&shape).map_err(|e| bad(e.to_string()))?;
    Ok(state)
}
