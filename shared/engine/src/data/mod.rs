//! Reading labelled text datasets from CSV, TSV or JSON Lines: a text column,
//! an optional second text column (sentence pairs, e.g. NLI), and a label
//! column whose values are integers (class ids) or strings (class names).
//!
//! Columns are detected from the header when not named, the way GLUE/SNLI
//! files in the Hugging Face `datasets` exports are laid out (`sentence`,
//! `text`, `sentence1`+`sentence2`, `premise`+`hypothesis`, `label`, …).
//! One column serves one role: text, text pair and label columns must differ.
//! Errors name the file, the line and the column. Everything works from bytes
//! (the browser reads a local file into memory); [`read_dataset_file`] is the
//! native convenience.
//!
//! Files are UTF-8 (a byte order mark is fine); a byte that is not is an
//! error naming its line and offset. Lines end in `\n`, `\r\n` or, in a
//! file without any `\n`, a bare `\r` (classic Mac OS), for every format.
//! [`read_text_lines`] reads a plain text file, one text per line, the same
//! way.
//!
//! Nothing is dropped or altered silently:
//! - every CSV/TSV row has exactly as many fields as the header (blank lines
//!   are ignored); a row with more or fewer is an error;
//! - JSONL cells in the columns used must be strings, numbers or booleans;
//!   integral numbers read as integers (`1.0` is `1`);
//! - without label names, labels are either all class ids (integers `0`,
//!   `1`, …, defining the classes `0..=max`, at most [`MAX_CLASSES`]) or all
//!   class names (sorted to give ids); a mix is an error;
//! - a row is *unlabelled* when its label is empty, `-1` or `-` (the SNLI and
//!   GLUE conventions for "no gold label"). With
//!   [`ColumnSpec::skip_rows_without_label`] such rows are skipped and counted
//!   in [`Dataset::skipped`], but if more than a quarter of the rows are
//!   unlabelled the file is refused (a ±1-labelled file is never halved);
//!   other negative integers are always errors.

use std::collections::BTreeSet;
use std::fmt;

/// Most classes that integer labels may define (`0..=max`): a stray huge
/// label must not make a giant class list.
pub const MAX_CLASSES: usize = 1000;

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
    /// From a file name's extension: `.csv`, `.tsv`/`.tab`, `.jsonl`/`.ndjson`/`.json`
    /// (`.json` is read as JSON Lines, one object per line).
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
    /// Skip rows without a label — an empty label, `-1` or `-` (SNLI marks
    /// examples without a gold label with -1 or -) — instead of failing. The
    /// skipped rows are counted in [`Dataset::skipped`]; more than a quarter
    /// of the rows without a label is an error. Other negative integers are
    /// errors either way.
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

/// Rows skipped because they had no label (see
/// [`ColumnSpec::skip_rows_without_label`]). Displays as
/// "skipped K rows without a label (first at line L)".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkippedRows {
    pub count: usize,
    /// Line of the first skipped row.
    pub first_line: Option<u64>,
}

impl fmt::Display for SkippedRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = if self.count == 1 { "row" } else { "rows" };
        write!(f, "skipped {} {rows} without a label", self.count)?;
        if let Some(line) = self.first_line {
            write!(f, " (first at line {line})")?;
        }
        Ok(())
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
    /// Rows skipped for having no label (none unless
    /// [`ColumnSpec::skip_rows_without_label`]); print it so users know.
    pub skipped: SkippedRows,
    /// Whether labels were class ids read as positions in given class names
    /// ([`ColumnSpec::label_names`] that are not those integers): `1` meant
    /// `label_names[1]`. Say so, with the mapping ([`Self::class_ids_note`]),
    /// since ids numbered in another order (GLUE's MNLI against sorted
    /// names) would otherwise swap classes without a word.
    pub labels_were_ids: bool,
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

    /// When [`Self::labels_were_ids`], what they were read as: "labels are
    /// class ids, read in the order of the classes: 0 = neg, 1 = pos".
    pub fn class_ids_note(&self) -> Option<String> {
        self.labels_were_ids.then(|| {
            let mapping: Vec<String> = self
                .label_names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{i} = {n}"))
                .collect();
            format!(
                "labels are class ids, read in the order of the classes: {}",
                mapping.join(", ")
            )
        })
    }

    /// Examples per class id (length [`Self::num_labels`]); a zero is a
    /// class without examples (integer labels define every id up to the
    /// largest).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_labels()];
        for label in self.examples.iter().filter_map(|e| e.label) {
            if let Some(count) = counts.get_mut(label as usize) {
                *count += 1;
            }
        }
        counts
    }
}

/// Why a dataset could not be read. Lines are 1-based; the header is line 1
/// for CSV/TSV.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The I/O error is in the message (not a `source`), so that a chain
    /// of causes shows it once.
    #[error("{file}: cannot read: {error}")]
    Io { file: String, error: std::io::Error },
    #[error(
        "{file}: cannot tell the format from the name (expected .csv, .tsv, .tab, .jsonl, \
         .ndjson or .json; .json means JSON Lines, one object per line)"
    )]
    UnknownFormat { file: String },
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: String,
        line: u64,
        message: String,
    },
    /// `hint`: why the header may be misread (e.g. a TSV file named `.csv`).
    #[error("{file}: no column `{column}` (columns: {available}){}", hint_suffix(.hint))]
    MissingColumn {
        file: String,
        column: String,
        available: String,
        hint: Option<String>,
    },
    /// `hint`: why the header may be misread (e.g. a TSV file named `.csv`).
    #[error(
        "{file}: cannot tell which column holds the text (columns: {available}); {}",
        .hint.as_deref().unwrap_or("name it")
    )]
    NoTextColumn {
        file: String,
        available: String,
        hint: Option<String>,
    },
    /// One column given or detected for two roles (e.g. text and label).
    #[error("{file}: column `{column}` cannot be both the {first} and the {second}")]
    ColumnRoles {
        file: String,
        column: String,
        first: &'static str,
        second: &'static str,
    },
    #[error("{file}:{line}: column `{column}`: {message}")]
    Value {
        file: String,
        line: u64,
        column: String,
        message: String,
    },
    /// A label that is missing or not one of the classes (names or ids).
    #[error("{file}:{line}: column `{column}`: {message}")]
    Label {
        file: String,
        line: u64,
        column: String,
        message: String,
    },
    /// A byte that is not UTF-8: the first one, `offset` bytes from the
    /// file's start (a byte order mark included), on line `line`.
    #[error(
        "{file}:{line}: not valid UTF-8 (byte {byte:#04x} at offset {offset}); \
         save the file as UTF-8"
    )]
    NotUtf8 {
        file: String,
        line: u64,
        offset: usize,
        byte: u8,
    },
    /// No bytes, or only whitespace (and a byte order mark).
    #[error("{file}: the file is empty")]
    EmptyFile { file: String },
    /// A header but no data rows (or none left after skipping).
    #[error("{file}: no examples")]
    Empty { file: String },
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default()
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
    let bytes = std::fs::read(path).map_err(|error| DataError::Io {
        file: file.clone(),
        error,
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
    read_with(bytes, format, spec, file, true)
}

/// Reads only the text column(s) of a dataset (`fedsb embed`): no label
/// column is looked for or read, so any labels (or none) are fine; every
/// example's label is `None`. `spec`'s label fields are ignored.
pub fn read_texts_only(
    bytes: &[u8],
    format: DataFormat,
    spec: &ColumnSpec,
    file: &str,
) -> Result<Dataset, DataError> {
    read_with(bytes, format, spec, file, false)
}

fn read_with(
    bytes: &[u8],
    format: DataFormat,
    spec: &ColumnSpec,
    file: &str,
    labels: bool,
) -> Result<Dataset, DataError> {
    let content = bytes.strip_prefix(BOM).unwrap_or(bytes);
    if content.iter().all(u8::is_ascii_whitespace) {
        return Err(DataError::EmptyFile {
            file: file.to_owned(),
        });
    }
    let text = utf8(bytes, file)?;
    let table = match format {
        DataFormat::Csv => read_delimited(text, b',', true, file)?,
        DataFormat::Tsv => read_delimited(text, b'\t', false, file)?,
        DataFormat::Jsonl => read_jsonl(text, file)?,
    };
    build_dataset(table, spec, file, labels)
}

/// Reads a plain text file of one text per line (`fedsb embed --input
/// texts.txt`): its lines that are not blank, as they are. UTF-8, with or
/// without a byte order mark; lines end as in the datasets.
pub fn read_text_lines(bytes: &[u8], file: &str) -> Result<Vec<String>, DataError> {
    let text = utf8(bytes, file)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    Ok(lines(text)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// UTF-8 byte order mark.
const BOM: &[u8] = "\u{feff}".as_bytes();

/// The byte that ends a line: `\n` (after an optional `\r`), or `\r` in a
/// file without any `\n` (classic Mac OS line endings). The csv crate ends
/// records at either; lines are counted by this one.
fn line_break(bytes: &[u8]) -> u8 {
    if !bytes.contains(&b'\n') && bytes.contains(&b'\r') {
        b'\r'
    } else {
        b'\n'
    }
}

/// The lines of `text`, without their `\n`, `\r\n` or bare `\r` (see
/// [`line_break`]).
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let split = char::from(line_break(text.as_bytes()));
    text.split(split).map(|l| l.strip_suffix('\r').unwrap_or(l))
}

/// 1-based line numbers of byte offsets into a file, counted on from the
/// last offset asked for (offsets mostly come in order).
struct LineCounter<'a> {
    bytes: &'a [u8],
    line_break: u8,
    offset: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            line_break: line_break(bytes),
            offset: 0,
            line: 1,
        }
    }

    /// The line of the record the csv reader positions at `offset`. The
    /// position can be that of line breaks before the record's first byte:
    /// the `\n` of its predecessor's `\r\n` (the reader ends a record at
    /// the `\r`) and blank lines, which the reader skips. The record starts
    /// on the line of its first byte after them.
    fn record_line(&mut self, offset: usize) -> u64 {
        let breaks = self
            .bytes
            .get(offset..)
            .unwrap_or_default()
            .iter()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .count();
        self.line_at(offset + breaks)
    }

    /// The line of the byte at `offset`.
    fn line_at(&mut self, offset: usize) -> u64 {
        let offset = offset.min(self.bytes.len());
        if offset < self.offset {
            (self.offset, self.line) = (0, 1);
        }
        let breaks = self.bytes[self.offset..offset]
            .iter()
            .filter(|&&b| b == self.line_break)
            .count();
        self.line += breaks as u64;
        self.offset = offset;
        self.line
    }
}

/// `bytes` as text; an error names the line and offset of the first byte
/// that is not UTF-8.
fn utf8<'a>(bytes: &'a [u8], file: &str) -> Result<&'a str, DataError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let offset = e.valid_up_to();
        DataError::NotUtf8 {
            file: file.to_owned(),
            line: LineCounter::new(bytes).line_at(offset),
            offset,
            byte: bytes[offset],
        }
    })
}

/// One cell of a [`Table`].
enum Cell {
    /// No such field (JSONL: key absent or `null`).
    Missing,
    Text(String),
    /// A JSON object or array: "an object" or "an array". Only an error
    /// where the column is used.
    Nested(&'static str),
}

/// Rows of cells, each with the line it starts on.
struct Table {
    columns: Vec<String>,
    rows: Vec<(u64, Vec<Cell>)>,
}

/// A hint when a header of one column looks like another format's: the
/// file's content does not match its extension.
fn header_hint(columns: &[String]) -> Option<String> {
    let first = columns.first()?;
    let looks = if first.starts_with('{') {
        "like JSON: is this a JSON Lines (.jsonl) file?"
    } else if columns.len() > 1 {
        // A first line of data read as the header: a number or a sentence
        // among the column names.
        let data_like = columns
            .iter()
            .any(|c| c.trim().parse::<f64>().is_ok() || c.split_whitespace().count() >= 4);
        return data_like.then(|| {
            "the first line looks like data, not a header: the first line must name the \
             columns (for instance `sentence` and `label`)"
                .to_owned()
        });
    } else if first.contains('\t') {
        "tab-separated: is this a .tsv file?"
    } else if first.contains(',') {
        "comma-separated: is this a .csv file?"
    } else {
        return None;
    };
    Some(format!("the header looks {looks}"))
}

/// CSV or TSV. Lines are counted here, not by the csv crate, which counts
/// only `\n` (a file with bare `\r` line endings would be all line 1).
fn read_delimited(
    text: &str,
    delimiter: u8,
    quoting: bool,
    file: &str,
) -> Result<Table, DataError> {
    let bytes = text.as_bytes();
    // The default terminator ends records at `\r`, `\n` or `\r\n`.
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let mut counter = LineCounter::new(bytes);
    let line_break = char::from(counter.line_break);
    let syntax = |e: csv::Error| DataError::Syntax {
        file: file.to_owned(),
        line: e.position().map_or(0, |p| {
            LineCounter::new(bytes).record_line(p.byte() as usize)
        }),
        message: e.to_string(),
    };
    let columns: Vec<String> = reader
        .headers()
        .map_err(syntax)?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_owned())
        .collect();
    let hint = header_hint(&columns);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(syntax)?;
        let line = record
            .position()
            .map_or(0, |p| counter.record_line(p.byte() as usize));
        if record.len() == 1
            && (record[0].is_empty() || (columns.len() > 1 && record[0].trim().is_empty()))
        {
            continue; // blank line
        }
        if record.len() != columns.len() {
            let fields = if record.len() == 1 { "field" } else { "fields" };
            let mut message = format!(
                "{} {fields}, but the header has {}",
                record.len(),
                columns.len()
            );
            if let Some(hint) = &hint {
                message.push_str(&format!(" ({hint})"));
            } else if quoting && record.len() < columns.len() {
                // An unterminated quote swallows the rest of the file into
                // its field: name the line where that field starts.
                let mut start = line;
                let mut opened = None;
                for field in &record {
                    if field.contains(line_break) {
                        opened = Some(start);
                    }
                    start += field.matches(line_break).count() as u64;
                }
                if let Some(opened) = opened {
                    message.push_str(&format!(
                        " (a quote opened on line {opened} is never closed?)"
                    ));
                }
            }
            return Err(DataError::Syntax {
                file: file.to_owned(),
                line,
                message,
            });
        }
        let cells = record.iter().map(|f| Cell::Text(f.to_owned())).collect();
        rows.push((line, cells));
    }
    Ok(Table { columns, rows })
}

/// A JSON value as cell text; integral numbers that fit an `i64` read as
/// integers (`1.0` is `1`), so that `1` and `1.0` are one class.
fn json_cell(value: Option<&serde_json::Value>) -> Cell {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) => Cell::Missing,
        Some(Value::String(s)) => Cell::Text(s.clone()),
        Some(Value::Number(n)) => Cell::Text(match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f))
                if f.fract() == 0.0
                    && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) =>
            {
                (f as i64).to_string()
            }
            _ => n.to_string(),
        }),
        Some(Value::Bool(b)) => Cell::Text(b.to_string()),
        Some(Value::Object(_)) => Cell::Nested("an object"),
        Some(Value::Array(_)) => Cell::Nested("an array"),
    }
}

fn read_jsonl(text: &str, file: &str) -> Result<Table, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut columns: Vec<String> = Vec::new();
    let mut objects = Vec::new();
    for (i, raw) in lines(text).enumerate() {
        let line = i as u64 + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        if objects.is_empty() && raw.starts_with('[') {
            return Err(DataError::Syntax {
                file: file.to_owned(),
                line,
                message: "a JSON array: fedsb reads JSON Lines (one object per line); \
                          convert it, e.g. with jq -c '.[]'"
                    .into(),
            });
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
            let cells = columns.iter().map(|c| json_cell(map.get(c))).collect();
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

/// Label values that mean "no label" (SNLI/GLUE conventions).
fn is_unlabelled(value: &str) -> bool {
    matches!(value, "" | "-1" | "-")
}

fn build_dataset(
    table: Table,
    spec: &ColumnSpec,
    file: &str,
    labels: bool,
) -> Result<Dataset, DataError> {
    let available = || table.columns.join(", ");
    let hint = || header_hint(&table.columns);
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
            hint: hint(),
        })
    };
    let no_text = || DataError::NoTextColumn {
        file: file.to_owned(),
        available: available(),
        hint: hint(),
    };

    let (text, pair) = match (&spec.text, &spec.text_pair) {
        (Some(t), p) => (require(t)?, p.as_deref().map(require).transpose()?),
        (None, Some(p)) => {
            let text = TEXT_COLUMNS
                .iter()
                .chain(PAIR_COLUMNS.iter().map(|(a, _)| a))
                .filter(|c| !c.eq_ignore_ascii_case(p))
                .find_map(|c| find(c))
                .ok_or_else(no_text)?;
            (text, Some(require(p)?))
        }
        (None, None) => {
            if let Some((a, b)) = PAIR_COLUMNS
                .iter()
                .find_map(|(a, b)| Some((find(a)?, find(b)?)))
            {
                (a, Some(b))
            } else {
                let text = TEXT_COLUMNS
                    .iter()
                    .find_map(|c| find(c))
                    .ok_or_else(no_text)?;
                (text, None)
            }
        }
    };
    let (label, label_role) = match &spec.label {
        _ if !labels => (None, "label column"),
        Some(l) => (Some(require(l)?), "label column"),
        None => (
            LABEL_COLUMNS.iter().find_map(|c| find(c)),
            "label column (detected)",
        ),
    };
    let roles = [
        (Some(text), "text column"),
        (pair, "text pair column"),
        (label, label_role),
    ];
    for (i, &(a, first)) in roles.iter().enumerate() {
        for &(b, second) in &roles[i + 1..] {
            if let (Some(a), Some(b)) = (a, b) {
                if a == b {
                    return Err(DataError::ColumnRoles {
                        file: file.to_owned(),
                        column: table.columns[a].clone(),
                        first,
                        second,
                    });
                }
            }
        }
    }

    // A cell's text; `missing` for an absent cell (None: an error).
    let cell = |line: u64, cells: &[Cell], col: usize, missing: Option<&'static str>| {
        let error = |message: String| DataError::Value {
            file: file.to_owned(),
            line,
            column: table.columns[col].clone(),
            message,
        };
        match &cells[col] {
            Cell::Text(s) => Ok(s.clone()),
            Cell::Missing => missing
                .map(str::to_owned)
                .ok_or_else(|| error("missing value".into())),
            Cell::Nested(kind) => Err(error(format!(
                "expected a string, number or boolean, found {kind}"
            ))),
        }
    };

    // First pass: texts and raw label strings.
    let mut raw = Vec::with_capacity(table.rows.len());
    let mut skipped = SkippedRows::default();
    for (line, cells) in &table.rows {
        let raw_label = match label {
            Some(col) => {
                let value = cell(*line, cells, col, Some(""))?.trim().to_owned();
                if spec.skip_rows_without_label && is_unlabelled(&value) {
                    skipped.count += 1;
                    skipped.first_line.get_or_insert(*line);
                    continue;
                }
                Some(value)
            }
            None => None,
        };
        let text_value = cell(*line, cells, text, None)?;
        let pair_value = pair.map(|col| cell(*line, cells, col, None)).transpose()?;
        raw.push((*line, text_value, pair_value, raw_label));
    }

    let label_error = |line: u64, message: String| DataError::Label {
        file: file.to_owned(),
        line,
        column: label.map(|c| table.columns[c].clone()).unwrap_or_default(),
        message,
    };
    if skipped.count * 4 > table.rows.len() {
        let first = skipped.first_line.unwrap_or(0);
        return Err(label_error(
            first,
            format!(
                "{} of {} rows have no label (empty, -1 or -; first at line {first}): \
                 if -1 is a class here, relabel the classes 0, 1, … or give them names",
                skipped.count,
                table.rows.len()
            ),
        ));
    }
    if raw.is_empty() {
        return Err(DataError::Empty {
            file: file.to_owned(),
        });
    }

    // Second pass: labels to class ids.
    let label_names: Vec<String> = match (&spec.label_names, label) {
        (_, None) => Vec::new(),
        (Some(names), Some(_)) => names.clone(),
        (None, Some(_)) => {
            let values = raw
                .iter()
                .map(|(line, _, _, l)| (*line, l.as_deref().unwrap_or("")));
            let mut first_id = None; // (line, value, parsed)
            let mut first_name = None; // (line, value)
            let (mut ids, mut names) = (0usize, 0usize);
            for (line, v) in values.clone() {
                if v.is_empty() {
                    return Err(label_error(line, "missing value".into()));
                }
                match v.parse::<i64>() {
                    Ok(_) => {
                        ids += 1;
                        first_id.get_or_insert((line, v));
                    }
                    Err(_) => {
                        names += 1;
                        first_name.get_or_insert((line, v));
                    }
                }
            }
            match (first_id, first_name) {
                (Some((id_line, id)), Some((name_line, name))) => {
                    // Report on the line of the odd one out.
                    let line = if names <= ids { name_line } else { id_line };
                    return Err(label_error(
                        line,
                        format!(
                            "labels mix class ids (line {id_line}: {id}) and names \
                             (line {name_line}: {name})"
                        ),
                    ));
                }
                (Some(_), None) => {
                    let mut max = (0u64, 0u64); // (id, line)
                    for (line, v) in values {
                        let id = v.parse::<i64>().expect("checked");
                        let id = u64::try_from(id).map_err(|_| {
                            label_error(line, format!("label {v} is not a class id (0, 1, …)"))
                        })?;
                        if id > max.0 {
                            max = (id, line);
                        }
                    }
                    let (max, line) = max;
                    if max >= MAX_CLASSES as u64 {
                        return Err(label_error(
                            line,
                            format!(
                                "label {max}: integer labels are class ids 0, 1, …; \
                                 this one would make {} classes",
                                max + 1
                            ),
                        ));
                    }
                    (0..=max).map(|i| i.to_string()).collect()
                }
                _ => values
                    .map(|(_, v)| v.to_owned())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            }
        }
    };
    let mut labels_were_ids = false;
    let examples = raw
        .into_iter()
        .map(|(line, text, text_pair, raw_label)| {
            let label = raw_label
                .map(|v| {
                    if let Some(id) = label_names.iter().position(|n| *n == v) {
                        return Ok(id as u32);
                    }
                    match v.parse::<u32>() {
                        Ok(id) if (id as usize) < label_names.len() => {
                            labels_were_ids = true;
                            Ok(id)
                        }
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
        skipped,
        labels_were_ids,
    })
}
