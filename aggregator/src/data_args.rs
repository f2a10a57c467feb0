//! The data-file column flags shared by `fedsb init`, `train`, `sim` and
//! `join`, the checks every one of them makes on a labelled file, and the
//! classes a command that trains a head reads its training data with
//! ([`head_classes`], [`read_training_set`]).

use std::path::Path;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::{read_dataset_file, ColumnSpec, DataError, Dataset};

/// `--text-column`, `--text-pair-column`, `--label-column`.
#[derive(Debug, Clone, Args)]
pub struct DataColumns {
    /// Text column (detected when not given).
    #[arg(long)]
    pub text_column: Option<String>,
    /// Second text column of sentence pairs.
    #[arg(long)]
    pub text_pair_column: Option<String>,
    /// Label column (detected when not given). Its values are class names or
    /// class ids (the task's, where there is a task).
    #[arg(long)]
    pub label_column: Option<String>,
}

impl DataColumns {
    /// The reader's spec for these columns, with `label_names` (class names in
    /// head order; `None`: the data's own); rows without a label are skipped.
    pub fn spec(&self, label_names: Option<Vec<String>>) -> ColumnSpec {
        ColumnSpec {
            text: self.text_column.clone(),
            text_pair: self.text_pair_column.clone(),
            label: self.label_column.clone(),
            label_names,
            skip_rows_without_label: true,
        }
    }
}

/// Refuses a `--labels` list with a blank class or a class named twice
/// (`fedsb init`, `train`, `sim`, `eval`).
pub fn check_labels_flag(labels: Option<&[String]>) -> anyhow::Result<()> {
    if let Some(labels) = labels {
        if let Err(e) = crate::participant::check_class_names(labels) {
            bail!("--labels {}: {e}", labels.join(","));
        }
    }
    Ok(())
}

/// The classes of the head a command trains, in head order, and where they
/// come from.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadClasses {
    pub names: Vec<String>,
    /// `--labels`, or the `--init` file whose head they are (for messages).
    pub source: String,
}

/// The classes a command that trains a head (`fedsb train`, `fedsb sim`)
/// reads its training data with. Starting from an adapter file's head
/// (`init`: its path and its `labels` metadata), they are that head's, in
/// its order, which `--labels` (`given`) must then name in the same order;
/// otherwise `--labels`; otherwise `None`: the training data's own classes
/// (names sorted, or ids).
pub fn head_classes(
    init: Option<(&str, Option<&[String]>)>,
    given: Option<&[String]>,
) -> anyhow::Result<Option<HeadClasses>> {
    check_labels_flag(given)?;
    match (init, given) {
        (Some((file, Some(head))), Some(given)) if given != head => bail!(
            "--labels {given:?} differ from the classes {head:?} of the head of {file} \
             (--init, its labels metadata): leave --labels out, or give them in that order"
        ),
        (Some((file, Some(head))), _) => Ok(Some(HeadClasses {
            names: head.to_vec(),
            source: format!("the head of {file} (--init)"),
        })),
        (_, Some(given)) => Ok(Some(HeadClasses {
            names: given.to_vec(),
            source: "--labels".to_owned(),
        })),
        (_, None) => Ok(None),
    }
}

/// Reads the training data `path` with `columns` and the head's `classes`
/// (none: the data's own), refusing a file without a label column; a label
/// that is not one of `classes` is refused, naming them and where they come
/// from.
pub fn read_training_set(
    path: &Path,
    columns: &DataColumns,
    classes: Option<&HeadClasses>,
) -> anyhow::Result<Dataset> {
    let names = classes.map(|c| c.names.clone());
    let data = read_dataset_file(path, &columns.spec(names)).map_err(|e| {
        reading_error(
            e,
            path,
            classes.map(|c| {
                format!(
                    "its labels must be the classes {:?} of {}",
                    c.names, c.source
                )
            }),
        )
    })?;
    require_label_column(&data, path)?;
    Ok(data)
}

/// An error reading the data file `path`, with `label_hint` (what its
/// labels must be) where a label was wrong; other errors (syntax, columns,
/// encoding) name the file alone.
pub fn reading_error(e: DataError, path: &Path, label_hint: Option<String>) -> anyhow::Error {
    let hint = label_hint.filter(|_| matches!(e, DataError::Label { .. }));
    let e = anyhow::Error::new(e);
    match hint {
        Some(h) => e.context(format!("reading {}: {h}", path.display())),
        None => e.context(format!("reading {}", path.display())),
    }
}

/// Refuses a file read without finding a label column, and says how many
/// rows it skipped for having no label ([`note_labels`]).
pub fn require_label_column(data: &Dataset, path: &Path) -> anyhow::Result<()> {
    if data.label_column.is_none() {
        bail!(
            "{}: no label column found among its columns (name it with --label-column)",
            path.display()
        );
    }
    note_labels(data, path);
    Ok(())
}

/// Warns when rows were skipped for having no label (empty, -1 or -), so
/// that a file never loses rows without a word, and says how class ids
/// were read when the classes have names ([`Dataset::class_ids_note`]).
pub fn note_labels(data: &Dataset, path: &Path) {
    if data.skipped.count > 0 {
        tracing::warn!(file = %path.display(), "{}", data.skipped);
    }
    if let Some(note) = data.class_ids_note() {
        tracing::info!(file = %path.display(), "{note}");
    }
}

/// Reads an evaluation set with the columns and class ids of the training
/// set `train` ([`same_columns_as`]), saying how many rows it skipped.
pub fn read_eval_set(path: &Path, train: &Dataset) -> anyhow::Result<Dataset> {
    let eval = read_dataset_file(path, &same_columns_as(train)).with_context(|| {
        format!(
            "reading {} with the columns and classes found in --train",
            path.display()
        )
    })?;
    note_labels(&eval, path);
    Ok(eval)
}

/// The spec that reads another file (an evaluation set) with the columns and
/// the class ids found in `data`.
pub fn same_columns_as(data: &Dataset) -> ColumnSpec {
    ColumnSpec {
        text: Some(data.text_column.clone()),
        text_pair: data.text_pair_column.clone(),
        label: data.label_column.clone(),
        label_names: Some(data.label_names.clone()),
        skip_rows_without_label: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// An init file's classes win, in their order, and `--labels` must
    /// agree; without them `--labels`, and without both the data's own.
    #[test]
    fn an_init_files_classes_fix_the_heads() {
        let file = names(&["pos", "neg"]);
        let init = Some(("run.safetensors", Some(file.as_slice())));
        let got = head_classes(init, None).unwrap().unwrap();
        assert_eq!(got.names, file);
        assert!(got.source.contains("run.safetensors"), "{got:?}");
        assert_eq!(
            head_classes(init, Some(&file)).unwrap().unwrap().names,
            file
        );
        let err = head_classes(init, Some(&names(&["neg", "pos"])))
            .unwrap_err()
            .to_string();
        for part in [
            "--labels [\"neg\", \"pos\"]",
            "[\"pos\", \"neg\"]",
            "run.safetensors",
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }
        // A file that names no classes leaves them to --labels or the data.
        let unnamed = Some(("old.safetensors", None));
        let given = names(&["b", "a"]);
        let got = head_classes(unnamed, Some(&given)).unwrap().unwrap();
        assert_eq!((got.names, got.source.as_str()), (given, "--labels"));
        assert_eq!(head_classes(unnamed, None).unwrap(), None);
        assert_eq!(head_classes(None, None).unwrap(), None);
    }

    /// The training data is read with the head's class ids; a label that
    /// is not one of them is refused, naming the classes and their source.
    #[test]
    fn the_training_set_is_read_with_the_heads_classes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.tsv");
        std::fs::write(&path, "sentence\tlabel\na\tpos\nb\tneg\n").unwrap();
        let columns = DataColumns {
            text_column: None,
            text_pair_column: None,
            label_column: None,
        };
        let own = read_training_set(&path, &columns, None).unwrap();
        assert_eq!(own.label_names, ["neg", "pos"]);
        let head = HeadClasses {
            names: names(&["pos", "neg"]),
            source: "the head of run.safetensors (--init)".to_owned(),
        };
        let data = read_training_set(&path, &columns, Some(&head)).unwrap();
        assert_eq!(data.label_names, ["pos", "neg"]);
        let labels: Vec<_> = data.examples.iter().map(|e| e.label).collect();
        assert_eq!(labels, [Some(0), Some(1)]);
        let ids = HeadClasses {
            names: names(&["0", "1"]),
            ..head
        };
        let err = format!(
            "{:#}",
            read_training_set(&path, &columns, Some(&ids)).unwrap_err()
        );
        for part in [
            "its labels must be the classes [\"0\", \"1\"] of the head of run.safetensors",
            "label \"pos\" is not one of the classes [0, 1]",
        ] {
            assert!(err.contains(part), "{part:?} not in {err}");
        }
    }
}
