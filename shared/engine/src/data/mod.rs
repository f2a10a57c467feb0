//! Reading labelled text datasets from CSV, TSV or JSON Lines: a text column,
//! an optional second text column (sentence pairs, e.g. NLI), and a label
//! column whose values are integers (class ids) or strings (class names).
//!
//! Columns are detected from the header when not named, the way GLUE/SNLI
//! files in the Hugging Face `datasets` exports are laid out (`sentence`,
//! `text`, `sentence1`+`sentence2`, `premise`+`hypothesis`, `label`, …).
//! Errors name the file, the line and the column. Everything works from bytes
//! (the browser reads a local file into memory); [`read_dataset_file`] is the
//! native convenience.

use std::collections::BTreeSet;

/// File format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// Comma-separated with a header row, RFC 4180 quoting.
    Csv,
    /// Tab-separated with a header row; quotes are ordinary characters (as in GLUE's TSVs).
    Tsv,
    /// One JSON object per line.
    Jsonl,
}

impl DataFormat {
    /// From a file name's extension: `.csv`, `.tsv`/`.tab`, `.jsonl`/`.ndjson`/`.json`.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Self::Csv),
            "tsv" | "tab" => Some(Self::Tsv),
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            _ => None,
        }
    }
}

/// Which columns to read; `None` means detect from the header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnSpec {
    pub text: Option<String>,
    /// Second sentence of a pair. Only detected when `text` is not given either.
    pub text_pair: Option<String>,
    pub label: Option<String>,
    /// Class names in class-id order. When given, a label value may be one of
    /// these names or an integer below their count; every participant of a
    /// task must use the same list so that class ids agree.
    pub label_names: Option<Vec<String>>,
    /// Skip rows whose label is empty or a negative integer (SNLI marks
    /// examples without a gold label with -1) instead of failing.
    pub skip_rows_without_label: bool,
}

/// One example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    /// Class id; `None` when the dataset has no label column.
    pub label: Option<u32>,
}

impl Example {
    /// `(text, text_pair)`, as [`crate::model::BertTokenizer::encode_mixed_batch`] takes it.
    pub fn as_input(&self) -> (&str, Option<&str>) {
        (&self.text, self.text_pair.as_deref())
    }
}

/// A dataset read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub text_column: String,
    pub text_pair_column: Option<String>,
    pub label_column: Option<String>,
    /// Class names by class id (integers as strings when labels were integers).
    pub label_names: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn num_labels(&self) -> usize {
        self.label_names.len()
    }
}

/// Why a dataset could not be read. Lines are 1-based; the header is line 1
/// for CSV/TSV.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: cannot tell the format from the name (expected .csv, .tsv, .jsonl)")]
    UnknownFormat { file: String },
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: String,
        line: u64,
        message: String,
    },
    #[error("{file}: no column `{column}` (columns: {available})")]
    MissingColumn {
        file: String,
        column: String,
        available: String,
    },
    #[error("{file}: cannot tell which column holds the text (columns: {available}); name it")]
    NoTextColumn { file: String, available: String },
    #[error("{file}:{line}: column `{column}`: {message}")]
    Value {
        file: String,
        line: u64,
        column: String,
        message: String,
    },
    #[error("{file}: no examples")]
    Empty { file: String },
}

/// Reads a dataset file, choosing the format from its extension.
#[cfg(not(target_arch = "wasm32"))]
pub fn read_dataset_file(
    path: impl AsRef<std::path::Path>,
    spec: &ColumnSpec,
) -> Result<Dataset, DataError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let format = DataFormat::from_file_name(&file)
        .ok_or_else(|| DataError::UnknownFormat { file: file.clone() })?;
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        file: file.clone(),
        source,
    })?;
    read_dataset(&bytes, format, spec, &file)
}

/// Reads a dataset from memory; `file` names it in errors.
pub fn read_dataset(
    bytes: &[u8],
    format: DataFormat,
    spec: &ColumnSpec,
    file: &str,
) -> Result<Dataset, DataError> {
    let table = match format {
        DataFormat::Csv => read_delimited(bytes, b',', true, file)?,
        DataFormat::Tsv => read_delimited(bytes, b'\t', false, file)?,
        DataFormat::Jsonl => read_jsonl(bytes, file)?,
    };
    build_dataset(table, spec, file)
}

/// Rows of cells, each with the line it starts on; `None` is a missing cell.
struct Table {
    columns: Vec<String>,
    rows: Vec<(u64, Vec<Option<String>>)>,
}

fn read_delimited(
    bytes: &[u8],
    delimiter: u8,
    quoting: bool,
    file: &str,
) -> Result<Table, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let syntax = |e: csv::Error| DataError::Syntax {
        file: file.to_owned(),
        line: e.position().map_or(0, |p| p.line()),
        message: e.to_string(),
    };
    let columns: Vec<String> = reader
        .headers()
        .map_err(syntax)?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_owned())
        .collect();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(syntax)?;
        let line = record.position().map_or(0, |p| p.line());
        if record.len() == 1 && record[0].is_empty() {
            continue; // blank line
        }
        if record.len() > columns.len() {
            return Err(DataError::Syntax {
                file: file.to_owned(),
                line,
                message: format!(
                    "{} fields, but the header has {}",
                    record.len(),
                    columns.len()
                ),
            });
        }
        let cells = (0..columns.len())
            .map(|i| record.get(i).map(str::to_owned))
            .collect();
        rows.push((line, cells));
    }
    Ok(Table { columns, rows })
}

fn read_jsonl(bytes: &[u8], file: &str) -> Result<Table, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::Syntax {
        file: file.to_owned(),
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64,
        message: "not valid UTF-8".into(),
    })?;
    let mut columns: Vec<String> = Vec::new();
    let mut objects = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| DataError::Syntax {
                file: file.to_owned(),
                line,
                message: e.to_string(),
            })?;
        let serde_json::Value::Object(map) = value else {
            return Err(DataError::Syntax {
                file: file.to_owned(),
                line,
                message: "expected a JSON object".into(),
            });
        };
        for key in map.keys() {
            if !columns.contains(key) {
                columns.push(key.clone());
            }
        }
        objects.push((line, map));
    }
    let rows = objects
        .into_iter()
        .map(|(line, map)| {
            let cells = columns
                .iter()
                .map(|c| match map.get(c) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .collect();
            (line, cells)
        })
        .collect();
    Ok(Table { columns, rows })
}

const PAIR_COLUMNS: &[(&str, &str)] = &[
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("text_a", "text_b"),
    ("text", "text_pair"),
];
const TEXT_COLUMNS: &[&str] = &[
    "sentence", "text", "content", "review", "document", "question",
];
const LABEL_COLUMNS: &[&str] = &[
    "label",
    "labels",
    "gold_label",
    "class",
    "target",
    "category",
];

fn build_dataset(table: Table, spec: &ColumnSpec, file: &str) -> Result<Dataset, DataError> {
    let available = || table.columns.join(", ");
    let find = |name: &str| {
        table
            .columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
    };
    let require = |name: &str| {
        find(name).ok_or_else(|| DataError::MissingColumn {
            file: file.to_owned(),
            column: name.to_owned(),
            available: available(),
        })
    };

    let (text, pair) = match (&spec.text, &spec.text_pair) {
        (Some(t), p) => (require(t)?, p.as_deref().map(require).transpose()?),
        (None, Some(p)) => {
            let text = TEXT_COLUMNS
                .iter()
                .chain(PAIR_COLUMNS.iter().map(|(a, _)| a))
                .filter(|c| !c.eq_ignore_ascii_case(p))
                .find_map(|c| find(c))
                .ok_or_else(|| DataError::NoTextColumn {
                    file: file.to_owned(),
                    available: available(),
                })?;
            (text, Some(require(p)?))
        }
        (None, None) => {
            if let Some((a, b)) = PAIR_COLUMNS
                .iter()
                .find_map(|(a, b)| Some((find(a)?, find(b)?)))
            {
                (a, Some(b))
            } else {
                let text = TEXT_COLUMNS.iter().find_map(|c| find(c)).ok_or_else(|| {
                    DataError::NoTextColumn {
                        file: file.to_owned(),
                        available: available(),
                    }
                })?;
                (text, None)
            }
        }
    };
    let label = match &spec.label {
        Some(l) => Some(require(l)?),
        None => LABEL_COLUMNS.iter().find_map(|c| find(c)),
    };

    let cell = |line: u64, cells: &[Option<String>], col: usize| -> Result<String, DataError> {
        cells[col].clone().ok_or_else(|| DataError::Value {
            file: file.to_owned(),
            line,
            column: table.columns[col].clone(),
            message: "missing value".into(),
        })
    };

    // First pass: texts and raw label strings.
    let mut raw = Vec::with_capacity(table.rows.len());
    for (line, cells) in &table.rows {
        let raw_label = match label {
            Some(col) => {
                let value = cells[col].as_deref().unwrap_or("").trim().to_owned();
                let unlabeled = value.is_empty() || value.parse::<i64>().is_ok_and(|v| v < 0);
                if unlabeled && spec.skip_rows_without_label {
                    continue;
                }
                Some(value)
            }
            None => None,
        };
        let text_value = cell(*line, cells, text)?;
        let pair_value = pair.map(|col| cell(*line, cells, col)).transpose()?;
        raw.push((*line, text_value, pair_value, raw_label));
    }
    if raw.is_empty() {
        return Err(DataError::Empty {
            file: file.to_owned(),
        });
    }

    // Second pass: labels to class ids.
    let label_error = |line: u64, message: String| DataError::Value {
        file: file.to_owned(),
        line,
        column: label.map(|c| table.columns[c].clone()).unwrap_or_default(),
        message,
    };
    let label_names: Vec<String> = match (&spec.label_names, label) {
        (_, None) => Vec::new(),
        (Some(names), Some(_)) => names.clone(),
        (None, Some(_)) => {
            let values = || {
                raw.iter()
                    .map(|(line, _, _, l)| (*line, l.as_deref().unwrap_or("")))
            };
            if values().all(|(_, v)| v.parse::<i64>().is_ok()) {
                let mut max = 0u32;
                for (line, v) in values() {
                    let id = v.parse::<i64>().expect("checked");
                    let id = u32::try_from(id).map_err(|_| {
                        label_error(line, format!("label {v} is not a class id (0, 1, …)"))
                    })?;
                    max = max.max(id);
                }
                (0..=max).map(|i| i.to_string()).collect()
            } else {
                let mut names = BTreeSet::new();
                for (line, v) in values() {
                    if v.is_empty() {
                        return Err(label_error(line, "missing value".into()));
                    }
                    names.insert(v.to_owned());
                }
                names.into_iter().collect()
            }
        }
    };
    let examples = raw
        .into_iter()
        .map(|(line, text, text_pair, raw_label)| {
            let label = raw_label
                .map(|v| {
                    if let Some(id) = label_names.iter().position(|n| *n == v) {
                        return Ok(id as u32);
                    }
                    match v.parse::<u32>() {
                        Ok(id) if (id as usize) < label_names.len() => Ok(id),
                        _ => Err(label_error(
                            line,
                            format!(
                                "label {v:?} is not one of the classes [{}]",
                                label_names.join(", ")
                            ),
                        )),
                    }
                })
                .transpose()?;
            Ok(Example {
                text,
                text_pair,
                label,
            })
        })
        .collect::<Result<Vec<_>, DataError>>()?;

    Ok(Dataset {
        examples,
        text_column: table.columns[text].clone(),
        text_pair_column: pair.map(|c| table.columns[c].clone()),
        label_column: label.map(|c| table.columns[c].clone()),
        label_names,
    })
}
