//! Checks the commands make on their arguments before any long work (model
//! loading, GPU setup, training), so that a wrong path or value fails in a
//! second, naming the flag, instead of after the run it would have ended;
//! the base model ([`load_base_model`]) whose SHA-256 the adapter files
//! a command reads must record, if they record one; and the adapter file
//! a training command starts from ([`InitFile`], `--init`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fedsb_aggregator::export::resolve_path;
use fedsb_aggregator::store::sha256_hex;
use fedsb_engine::data::Dataset;
use fedsb_engine::model::{BertConfig, BertWeights, ModelLoadError};
use fedsb_engine::reference::{ClassifierHead, LoraSbAdapters};

use crate::participant::{
    adapter_file_info, check_base_model, AdapterFileInfo, BASE_MODEL_SHA256, MAX_SEQ_LEN,
};

/// The base model of a command: its `model.safetensors` and that file's
/// SHA-256, which the adapter files the command writes record
/// ([`BASE_MODEL_SHA256`]) and those it reads must match.
#[derive(Debug, Clone)]
pub struct BaseModel {
    pub file: PathBuf,
    pub sha256: String,
}

impl BaseModel {
    /// Refuses the adapter file `path` (header `metadata`) when it records
    /// another base model; one that records none is accepted.
    pub fn check_adapter_file(
        &self,
        path: &Path,
        metadata: &HashMap<String, String>,
    ) -> anyhow::Result<()> {
        check_base_model(
            metadata,
            &path.display().to_string(),
            &self.file.display().to_string(),
            &self.sha256,
        )?;
        Ok(())
    }

    /// The metadata entry that records this model in an adapter file.
    pub fn metadata_entry(&self) -> (String, String) {
        (BASE_MODEL_SHA256.to_owned(), self.sha256.clone())
    }
}

/// The adapter file a training command starts from (`fedsb train --init`,
/// `fedsb sim --init`): its bytes, what it holds and its head's class names
/// (its `labels` metadata, in the head's order), which fix the classes the
/// command reads its data with ([`crate::data_args::head_classes`]).
#[derive(Debug)]
pub struct InitFile {
    /// The path, for messages.
    pub path: String,
    pub info: AdapterFileInfo,
    pub bytes: Vec<u8>,
    /// The head's classes, in order, when the file names them.
    pub labels: Option<Vec<String>>,
}

impl InitFile {
    /// Reads the file at `path` for a model of `num_layers` layers, refused
    /// when it was made for another base model than `base_model` or when
    /// its `labels` metadata does not name its head's classes.
    pub fn read(path: &Path, num_layers: usize, base_model: &BaseModel) -> anyhow::Result<Self> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).with_context(|| format!("reading {name}"))?;
        let context = || format!("adapter file {name} (--init)");
        let info = adapter_file_info(&bytes, num_layers).with_context(context)?;
        base_model
            .check_adapter_file(path, &info.metadata)
            .with_context(context)?;
        let labels = info.labels().with_context(context)?;
        Ok(Self {
            path: name,
            info,
            bytes,
            labels,
        })
    }

    /// The file's `A`, `B`, `R` of every module and its head, checked
    /// against the model and the training set's `classes`.
    pub fn model(
        &self,
        config: &BertConfig,
        classes: usize,
    ) -> anyhow::Result<(LoraSbAdapters<f32>, ClassifierHead<f32>)> {
        let name = &self.path;
        let (adapters, head) = self
            .info
            .read_model(&self.bytes, config)
            .with_context(|| format!("adapter file {name} (--init)"))?;
        let file_classes = head.bias.len();
        if file_classes != classes {
            bail!(
                "adapter file {name} (--init): its head has {file_classes} classes but the \
                 training data has {classes}"
            );
        }
        Ok((adapters, head))
    }
}

/// Loads a Hugging Face model directory's weights as
/// [`BertWeights::from_dir`] does, hashing `model.safetensors` from the
/// bytes read for loading (the file is read once).
pub fn load_base_model(dir: &Path) -> Result<(BertWeights, BaseModel), ModelLoadError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path)
            .map(|bytes| (bytes, path.clone()))
            .map_err(|source| ModelLoadError::Io {
                path: path.display().to_string(),
                source,
            })
    };
    let (config, _) = read("config.json")?;
    let (tensors, file) = read("model.safetensors")?;
    let sha256 = sha256_hex(&tensors);
    let weights = BertWeights::from_bytes(&config, &tensors)?;
    Ok((weights, BaseModel { file, sha256 }))
}

/// Refuses an output file `path` (given as `flag`) that could not be
/// written (a directory, one whose directory does not exist or takes no new
/// file), or that
/// is, links resolved, one of the command's `inputs` (`(what, path)`: its
/// data files, `--init` file, the model's files, its other outputs), which
/// writing it would destroy. Checked before any work is done.
pub fn check_output_file<P: AsRef<Path>>(
    path: &Path,
    flag: &str,
    inputs: &[(&str, P)],
) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!("{flag} {} is a directory; name a file", path.display());
    }
    if path.file_name().is_none() {
        bail!("{flag} {} names no file", path.display());
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            bail!(
                "{flag} {}: the directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    probe_writable(path, flag)?;
    if let Some(out) = resolve_path(path) {
        for (what, input) in inputs {
            let input = input.as_ref();
            if resolve_path(input).is_some_and(|i| i == out) {
                bail!(
                    "{flag} {} is {what} {}; writing it would destroy that file, so name another",
                    path.display(),
                    input.display()
                );
            }
        }
    }
    Ok(())
}

/// Whether a file can be made beside `path`, as every output is written (a
/// file beside it, then renamed over it): a read-only directory, a
/// filesystem such as /proc or /sys, or a missing permission is found before
/// the work, not after it. The probe file is removed at once.
fn probe_writable(path: &Path, flag: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let probe = dir.join(format!(".{name}.{}.probe", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bail!(
            "{flag} {}: cannot write a file in {}: {e}",
            path.display(),
            dir.display()
        ),
    }
}

/// Refuses an output directory `dir` (given as `flag`) that a command
/// could not write its files into alone: a file, or a directory that is not
/// empty, where files of an earlier run would stay beside this run's (a
/// 3-client run's `client-3.jsonl` beside a 2-client run's shards). A
/// missing directory is created by the command. Checked before any work.
pub fn check_output_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{flag} {} is a file; name a directory", dir.display());
    }
    if dir.is_dir() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        if let Some(entry) = entries.next() {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            bail!(
                "{flag} {} is not empty (it holds {}); give a new or empty directory, so that \
                 no file of an earlier run is taken for one of this run's",
                dir.display(),
                entry.file_name().to_string_lossy()
            );
        }
    }
    Ok(())
}

/// What a command that trains reads, as inputs for [`check_output_file`]:
/// `--train`, `--eval`, the `--init` file if any and the files of the
/// `--model` directory.
pub fn training_inputs(
    model: &Path,
    train: &Path,
    eval: Option<&Path>,
    init: Option<&Path>,
) -> Vec<(&'static str, PathBuf)> {
    let mut inputs = vec![("the --train file", train.to_owned())];
    inputs.extend(eval.map(|e| ("the --eval file", e.to_owned())));
    inputs.extend(init.map(|i| ("the --init file", i.to_owned())));
    inputs.extend(
        ["config.json", "model.safetensors", "tokenizer.json"]
            .map(|name| ("a file of the --model", model.join(name))),
    );
    inputs
}

/// `--max-seq-len` when not given: 128 tokens, or the model's position
/// table if it is shorter.
pub const DEFAULT_MAX_SEQ_LEN: usize = 128;

/// `--rank` when not given and no `--init` file fixes it.
pub const DEFAULT_RANK: usize = 32;

/// The sequence length a command truncates at: `given`, refused when longer
/// than the model's position table, or [`DEFAULT_MAX_SEQ_LEN`] capped by it.
pub fn resolve_max_seq_len(given: Option<usize>, config: &BertConfig) -> anyhow::Result<usize> {
    match given {
        Some(n) if n > config.max_position_embeddings => bail!(
            "--max-seq-len {n} is longer than the model's {} positions \
             (max_position_embeddings in its config.json)",
            config.max_position_embeddings
        ),
        Some(n) => Ok(n),
        None => Ok(DEFAULT_MAX_SEQ_LEN.min(config.max_position_embeddings)),
    }
}

/// The sequence length a command reading the adapter file `file` truncates
/// at (`fedsb eval`, and `fedsb train`/`sim` with `--init`): `given`,
/// checked as [`resolve_max_seq_len`] checks it; else the length the file
/// was made at ([`MAX_SEQ_LEN`] in its `metadata`), so that it evaluates
/// and trains on as it was made; else [`resolve_max_seq_len`]'s default. A recorded length that is not a number from 3 (`[CLS]`, `[SEP]`
/// and a token) up to the model's position table is passed over with a
/// warning.
pub fn resolve_file_max_seq_len(
    given: Option<usize>,
    metadata: &HashMap<String, String>,
    file: &str,
    config: &BertConfig,
) -> anyhow::Result<usize> {
    if given.is_some() {
        return resolve_max_seq_len(given, config);
    }
    if let Some(recorded) = metadata.get(MAX_SEQ_LEN) {
        let positions = config.max_position_embeddings;
        match recorded.trim().parse::<usize>() {
            Ok(n) if (3..=positions).contains(&n) => return Ok(n),
            _ => tracing::warn!(
                "{file} records {MAX_SEQ_LEN} {recorded:?}, which is not a length from 3 to the \
                 model's {positions} positions: not used"
            ),
        }
    }
    resolve_max_seq_len(None, config)
}

/// Refuses training data with examples of fewer than two classes (nothing
/// to tell apart) and warns about classes without an example.
pub fn check_classes(data: &Dataset, path: &Path) -> anyhow::Result<()> {
    let counts = data.class_counts();
    let present: Vec<&str> = data
        .label_names
        .iter()
        .zip(&counts)
        .filter(|(_, &n)| n > 0)
        .map(|(name, _)| name.as_str())
        .collect();
    if present.len() < 2 {
        bail!(
            "{}: every example has the label {}; a classifier needs examples of at least \
             two classes",
            path.display(),
            present.first().copied().unwrap_or("(none)")
        );
    }
    let empty: Vec<&str> = data
        .label_names
        .iter()
        .zip(&counts)
        .filter(|(_, &n)| n == 0)
        .map(|(name, _)| name.as_str())
        .collect();
    if !empty.is_empty() {
        tracing::warn!(
            file = %path.display(),
            classes = ?empty,
            "no example has these classes (integer labels are class ids 0, 1, …)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedsb_engine::data::{read_dataset, ColumnSpec, DataFormat};

    const NO_INPUTS: &[(&str, &Path)] = &[];

    #[test]
    fn output_files_in_missing_directories_or_on_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_output_file(
            &dir.path().join("no/such/a.safetensors"),
            "--output",
            NO_INPUTS,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = check_output_file(dir.path(), "--out", NO_INPUTS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a directory"), "{err}");
        check_output_file(&dir.path().join("a.safetensors"), "--output", NO_INPUTS).unwrap();
        check_output_file(Path::new("a.safetensors"), "--output", NO_INPUTS).unwrap();
    }

    #[test]
    fn output_directories_must_be_new_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        check_output_dir(&d.join("new/sub"), "--write-shards").unwrap();
        check_output_dir(d, "--write-shards").unwrap();
        std::fs::write(d.join("client-3.jsonl"), "{}").unwrap();
        let err = check_output_dir(d, "--write-shards")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--write-shards")
                && err.contains("is not empty (it holds client-3.jsonl)"),
            "{err}"
        );
        let err = check_output_dir(&d.join("client-3.jsonl"), "--write-globals")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a file; name a directory"), "{err}");
    }

    #[test]
    fn an_output_that_is_an_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("train.tsv");
        std::fs::write(&train, "sentence\tlabel\nok\t1\n").unwrap();
        let link = dir.path().join("link.tsv");
        std::os::unix::fs::symlink(&train, &link).unwrap();
        let other = dir.path().join("out.safetensors");
        let inputs = [("the training file", train.as_path())];
        // The same file by another spelling, or through a link: refused, and
        // the file is left as it was.
        for out in [
            dir.path().join("sub/../train.tsv"),
            dir.path().join("./train.tsv"),
            link,
        ] {
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            let err = check_output_file(&out, "--output", &inputs)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--output")
                    && err.contains(&format!("is the training file {}", train.display()))
                    && err.contains("would destroy"),
                "{err}"
            );
        }
        assert_eq!(std::fs::read(&train).unwrap(), b"sentence\tlabel\nok\t1\n");
        // A new file, or an input that does not exist (yet): fine.
        check_output_file(&other, "--output", &inputs).unwrap();
        let missing = dir.path().join("missing.tsv");
        check_output_file(&other, "--output", &[("the eval file", missing.as_path())]).unwrap();
        // The model's files count as inputs.
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), b"w").unwrap();
        let inputs = training_inputs(&model, &dir.path().join("t.tsv"), None, None);
        let err = check_output_file(&model.join("model.safetensors"), "--out", &inputs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a file of the --model"), "{err}");
    }

    #[test]
    fn a_sequence_length_beyond_the_position_table_is_refused() {
        let config = BertConfig {
            max_position_embeddings: 512,
            ..BertConfig::default()
        };
        assert_eq!(resolve_max_seq_len(Some(512), &config).unwrap(), 512);
        assert_eq!(resolve_max_seq_len(None, &config).unwrap(), 128);
        let err = resolve_max_seq_len(Some(513), &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("512 positions"), "{err}");
        // Unset, a short position table caps the default.
        let short = BertConfig {
            max_position_embeddings: 32,
            ..BertConfig::default()
        };
        assert_eq!(resolve_max_seq_len(None, &short).unwrap(), 32);
    }

    /// Without --max-seq-len, eval truncates at the length the file
    /// records when the model has the positions for it, else at the
    /// default; --max-seq-len wins either way.
    #[test]
    fn eval_uses_the_sequence_length_the_file_records() {
        let config = BertConfig {
            max_position_embeddings: 64,
            ..BertConfig::default()
        };
        let recorded = |n: &str| HashMap::from([(MAX_SEQ_LEN.to_owned(), n.to_owned())]);
        let resolve = |given, metadata: &HashMap<String, String>| {
            resolve_file_max_seq_len(given, metadata, "a.safetensors", &config).unwrap()
        };
        assert_eq!(resolve(None, &recorded("32")), 32);
        assert_eq!(resolve(None, &recorded("64")), 64);
        assert_eq!(resolve(Some(16), &recorded("32")), 16);
        assert_eq!(resolve(None, &HashMap::new()), 64);
        for unusable in ["65", "2", "0", "many", ""] {
            assert_eq!(resolve(None, &recorded(unusable)), 64, "{unusable:?}");
        }
        let err = resolve_file_max_seq_len(Some(65), &recorded("32"), "a", &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-seq-len 65 is longer"), "{err}");
    }

    /// The model loads as from its directory, its hash is its
    /// model.safetensors's, and an adapter file recording another is
    /// refused, naming both files.
    #[test]
    fn a_base_model_is_hashed_as_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let config = BertConfig {
            vocab_size: 10,
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 12,
            max_position_embeddings: 16,
            ..BertConfig::default()
        };
        let weights = BertWeights::random(&config, 3, 0.3);
        let model = weights.to_safetensors();
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &model).unwrap();
        let (loaded, base) = load_base_model(dir.path()).unwrap();
        assert_eq!(loaded.config, config);
        assert_eq!(base.sha256, sha256_hex(&model));
        assert_eq!(base.file, dir.path().join("model.safetensors"));
        assert_eq!(
            base.metadata_entry(),
            ("base_model_sha256".to_owned(), sha256_hex(&model))
        );

        let adapter = Path::new("run.safetensors");
        let mut metadata = HashMap::from([base.metadata_entry()]);
        base.check_adapter_file(adapter, &metadata).unwrap();
        metadata.insert(BASE_MODEL_SHA256.to_owned(), sha256_hex(b"other"));
        let err = base
            .check_adapter_file(adapter, &metadata)
            .unwrap_err()
            .to_string();
        for part in [
            "run.safetensors was made for a base model",
            &format!("but {} has", base.file.display()),
            &sha256_hex(b"other")[..12],
            &base.sha256[..12],
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }
        base.check_adapter_file(adapter, &HashMap::new()).unwrap();

        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let err = load_base_model(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn one_class_is_refused() {
        let data = |text: &str| {
            read_dataset(
                text.as_bytes(),
                DataFormat::Tsv,
                &ColumnSpec::default(),
                "d.tsv",
            )
            .unwrap()
        };
        let err = check_classes(
            &data("sentence\tlabel\na\tpos\nb\tpos\n"),
            Path::new("d.tsv"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("every example has the label pos"), "{err}");
        check_classes(&data("sentence\tlabel\na\t1\nb\t2\n"), Path::new("d.tsv")).unwrap();
    }
}
