//! The data-file column flags shared by `fedsb init`, `train`, `sim` and
//! `join`, and the checks every one of them makes on a labelled file.

use std::path::Path;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::{read_dataset_file, ColumnSpec, Dataset};

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

/// Refuses a file read without finding a label column, and says how many
/// rows it skipped for having no label ([`note_skipped`]).
pub fn require_label_column(data: &Dataset, path: &Path) -> anyhow::Result<()> {
    if data.label_column.is_none() {
        bail!(
            "{}: no label column found among its columns (name it with --label-column)",
            path.display()
        );
    }
    note_skipped(data, path);
    Ok(())
}

/// Warns when rows were skipped for having no label (empty, -1 or -), so
/// that a file never loses rows without a word.
pub fn note_skipped(data: &Dataset, path: &Path) {
    if data.skipped.count > 0 {
        tracing::warn!(file = %path.display(), "{}", data.skipped);
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
    note_skipped(&eval, path);
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
