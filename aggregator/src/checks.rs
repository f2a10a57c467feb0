//! Checks the commands make on their arguments before any long work (model
//! loading, GPU setup, training), so that a wrong path or value fails in a
//! second, naming the flag, instead of after the run it would have ended.

use std::path::Path;

use anyhow::bail;
use fedsb_engine::data::Dataset;
use fedsb_engine::model::BertConfig;

/// Refuses an output file `path` (given as `flag`) that could not be
/// written: a directory, or one whose directory does not exist.
pub fn check_output_file(path: &Path, flag: &str) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!("{flag} {} is a directory; name a file", path.display());
    }
    if path.file_name().is_none() {
        bail!("{flag} {} names no file", path.display());
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => bail!(
            "{flag} {}: the directory {} does not exist",
            path.display(),
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// `--max-seq-len` when not given: 128 tokens, or the model's position
/// table if it is shorter.
pub const DEFAULT_MAX_SEQ_LEN: usize = 128;

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

    #[test]
    fn output_files_in_missing_directories_or_on_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_output_file(&dir.path().join("no/such/a.safetensors"), "--output")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = check_output_file(dir.path(), "--out")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a directory"), "{err}");
        check_output_file(&dir.path().join("a.safetensors"), "--output").unwrap();
        check_output_file(Path::new("a.safetensors"), "--output").unwrap();
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
