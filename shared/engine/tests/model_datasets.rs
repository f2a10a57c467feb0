//! Reading datasets (CSV, TSV, JSONL) from small generated files: column
//! detection, sentence pairs, integer and string labels, line endings and
//! encodings, and errors that name the file, line and column.

use std::path::PathBuf;

use fedsb_engine::data::{
    read_dataset, read_dataset_file, read_text_lines, read_texts_only, ColumnSpec, DataError,
    DataFormat, Example, SkippedRows, MAX_CLASSES,
};

fn write(name: &str, contents: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_datasets");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn ex(text: &str, pair: Option<&str>, label: Option<u32>) -> Example {
    Example {
        text: text.into(),
        text_pair: pair.map(Into::into),
        label,
    }
}

#[test]
fn csv_with_detected_columns_and_integer_labels() {
    let path = write(
        "sst2.csv",
        "idx,sentence,label\n0,\"a gripping, funny film\",1\n1,dull,0\n\n2,\"he said \"\"no\"\"\",1\n",
    );
    let ds = read_dataset_file(&path, &ColumnSpec::default()).unwrap();
    assert_eq!(ds.text_column, "sentence");
    assert_eq!(ds.text_pair_column, None);
    assert_eq!(ds.label_column.as_deref(), Some("label"));
    assert_eq!(ds.label_names, vec!["0", "1"]);
    assert_eq!(
        ds.examples,
        vec![
            ex("a gripping, funny film", None, Some(1)),
            ex("dull", None, Some(0)),
            ex("he said \"no\"", None, Some(1)),
        ]
    );
}

#[test]
fn tsv_pairs_with_string_labels_and_literal_quotes() {
    // GLUE-style TSV: quotes are text, not quoting.
    let path = write(
        "mnli.tsv",
        "premise\thypothesis\tlabel\n\
         He said \"hi.\tA greeting.\tentailment\n\
         The cat sleeps.\tThe cat runs.\tcontradiction\n\
         It rains.\tIt is cloudy.\tneutral\n\
         It rains.\tNobody is wet.\tcontradiction\n",
    );
    let ds = read_dataset_file(&path, &ColumnSpec::default()).unwrap();
    assert_eq!(
        (ds.text_column.as_str(), ds.text_pair_column.as_deref()),
        ("premise", Some("hypothesis"))
    );
    // String labels: sorted names, so every participant maps them alike.
    assert_eq!(
        ds.label_names,
        vec!["contradiction", "entailment", "neutral"]
    );
    assert_eq!(
        ds.examples[0],
        ex("He said \"hi.", Some("A greeting."), Some(1))
    );
    assert_eq!(
        ds.examples
            .iter()
            .map(|e| e.label.unwrap())
            .collect::<Vec<_>>(),
        vec![1, 0, 2, 0]
    );
    assert_eq!(ds.num_labels(), 3);
}

#[test]
fn jsonl_with_named_columns_label_names_and_unlabelled_rows_skipped() {
    let path = write(
        "snli.jsonl",
        r#"{"sentence1": "A man plays.", "sentence2": "Someone plays.", "gold": 0, "id": 7}
{"sentence1": "A dog barks.", "sentence2": "A cat meows.", "gold": "contradiction"}

{"sentence1": "No label here.", "sentence2": "Skip me.", "gold": -1}
{"sentence1": "Kids run.", "sentence2": "Children move.", "gold": "1"}
"#,
    );
    let spec = ColumnSpec {
        text: Some("sentence1".into()),
        text_pair: Some("sentence2".into()),
        label: Some("gold".into()),
        label_names: Some(vec![
            "entailment".into(),
            "neutral".into(),
            "contradiction".into(),
        ]),
        skip_rows_without_label: true,
    };
    let ds = read_dataset_file(&path, &spec).unwrap();
    assert_eq!(
        ds.examples,
        vec![
            ex("A man plays.", Some("Someone plays."), Some(0)),
            ex("A dog barks.", Some("A cat meows."), Some(2)),
            ex("Kids run.", Some("Children move."), Some(1)),
        ]
    );
    assert_eq!(ds.label_names.len(), 3);

    // Without skipping, -1 is an error on its line.
    let err = read_dataset_file(
        &path,
        &ColumnSpec {
            skip_rows_without_label: false,
            ..spec
        },
    )
    .unwrap_err();
    assert!(err.to_string().ends_with("snli.jsonl:4: column `gold`: label \"-1\" is not one of the classes [entailment, neutral, contradiction]"), "{err}");
}

#[test]
fn unlabelled_dataset_and_text_column_variants() {
    let ds = read_dataset(
        b"id,text\n1,hello\n2,world\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "mem.csv",
    )
    .unwrap();
    assert_eq!(ds.label_column, None);
    assert!(ds.label_names.is_empty());
    assert_eq!(ds.examples[1], ex("world", None, None));
    // Header names are matched case-insensitively; a BOM is ignored.
    let ds = read_dataset(
        "\u{feff}Text,Label\nhi,pos\n".as_bytes(),
        DataFormat::Csv,
        &ColumnSpec::default(),
        "x.csv",
    )
    .unwrap();
    assert_eq!(
        (ds.text_column.as_str(), ds.label_names.clone()),
        ("Text", vec!["pos".to_owned()])
    );
    assert_eq!(
        DataFormat::from_file_name("a/b.JSONL"),
        Some(DataFormat::Jsonl)
    );
    assert_eq!(
        DataFormat::from_file_name("train.tsv"),
        Some(DataFormat::Tsv)
    );
    assert_eq!(DataFormat::from_file_name("README"), None);
}

#[test]
fn errors_name_file_line_and_column() {
    let csv = |s: &str, spec: &ColumnSpec| {
        read_dataset(s.as_bytes(), DataFormat::Csv, spec, "train.csv").unwrap_err()
    };
    let none = ColumnSpec::default();

    let err = csv("sentence,label\nok,1\nbad,-3\n", &none);
    assert_eq!(
        err.to_string(),
        "train.csv:3: column `label`: label -3 is not a class id (0, 1, …)"
    );

    // A short row is a syntax error, not a row padded with missing cells.
    let err = csv("sentence,label\nok,1\nshort\n", &none);
    assert_eq!(
        err.to_string(),
        "train.csv:3: 1 field, but the header has 2"
    );
    assert!(matches!(err, DataError::Syntax { line: 3, .. }));

    let err = csv("sentence,label\nok,1\na,1,extra\n", &none);
    assert_eq!(
        err.to_string(),
        "train.csv:3: 3 fields, but the header has 2"
    );

    let err = csv("body,label\nx,1\n", &none);
    assert_eq!(
        err.to_string(),
        "train.csv: cannot tell which column holds the text (columns: body, label); name it"
    );

    let err = csv(
        "body,label\nx,1\n",
        &ColumnSpec {
            text: Some("review".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        err.to_string(),
        "train.csv: no column `review` (columns: body, label)"
    );

    let spec = ColumnSpec {
        label_names: Some(vec!["neg".into(), "pos".into()]),
        ..Default::default()
    };
    let err = csv("text,label\na,pos\nb,meh\n", &spec);
    assert_eq!(
        err.to_string(),
        "train.csv:3: column `label`: label \"meh\" is not one of the classes [neg, pos]"
    );

    let err = read_dataset(
        b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \n",
        DataFormat::Jsonl,
        &none,
        "d.jsonl",
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("d.jsonl:2: "), "{err}");
    let err = read_dataset(
        b"{\"label\": 1}\n[1]\n",
        DataFormat::Jsonl,
        &none,
        "d.jsonl",
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "d.jsonl:2: expected a JSON object");
    let err = read_dataset(
        b"{\"text\": \"a\", \"label\": 1}\n{\"label\": 0}\n",
        DataFormat::Jsonl,
        &none,
        "d.jsonl",
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "d.jsonl:2: column `text`: missing value");

    let err = csv("text,label\n", &none);
    assert_eq!(err.to_string(), "train.csv: no examples");

    let err = read_dataset_file(write("notes.txt", "x"), &none).unwrap_err();
    assert!(matches!(err, DataError::UnknownFormat { .. }), "{err:?}");
    let missing = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_datasets/absent.csv");
    let err = read_dataset_file(&missing, &none).unwrap_err();
    assert!(err.to_string().contains("absent.csv: cannot read"), "{err}");
}

fn read(
    bytes: &str,
    format: DataFormat,
    spec: &ColumnSpec,
    file: &str,
) -> Result<Vec<Example>, String> {
    read_dataset(bytes.as_bytes(), format, spec, file)
        .map(|ds| ds.examples)
        .map_err(|e| e.to_string())
}

fn skipping() -> ColumnSpec {
    ColumnSpec {
        skip_rows_without_label: true,
        ..Default::default()
    }
}

#[test]
fn short_rows_are_errors_not_padded_or_dropped() {
    // TSV with skipping: the short row used to be padded, then dropped as unlabelled.
    let err = read(
        "sentence\tlabel\na\t1\nb\t0\nc\t1\nd\n",
        DataFormat::Tsv,
        &skipping(),
        "t.tsv",
    )
    .unwrap_err();
    assert_eq!(err, "t.tsv:5: 1 field, but the header has 2");
    let err = read(
        "idx,sentence,label\n0,a,1\n1,b\n",
        DataFormat::Csv,
        &skipping(),
        "t.csv",
    )
    .unwrap_err();
    assert_eq!(err, "t.csv:3: 2 fields, but the header has 3");
    // Blank lines are still ignored; every row complete reads fine.
    let ds = read_dataset(
        b"sentence\tlabel\na\t1\n\nb\t0\n",
        DataFormat::Tsv,
        &ColumnSpec::default(),
        "t.tsv",
    )
    .unwrap();
    assert_eq!(ds.len(), 2);

    // An unterminated quote swallows the rest of the file into one field.
    let err = read(
        "text,label\n\"abc,1\nfoo,0\nbar,1\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "q.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "q.csv:2: 1 field, but the header has 2 (a quote opened on line 2 is never closed?)"
    );
    // The hint names the line where the runaway field starts, after a
    // legitimate multi-line field of the same record.
    let err = read(
        "id,text,pair,label\n1,\"a\nb\",\"c,0\nd,e,f,1\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "q.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "q.csv:2: 3 fields, but the header has 4 (a quote opened on line 3 is never closed?)"
    );
}

#[test]
fn only_empty_minus_one_or_dash_labels_are_skipped_and_counted() {
    // 12 rows, 3 without a label (-, empty, -1): a quarter is still accepted.
    let csv = "text,label\na,0\nb,1\nc,-\nd,1\ne,\nf,0\ng,-1\nh,1\ni,0\nj,1\nk,0\nl,1\n";
    let ds = read_dataset(csv.as_bytes(), DataFormat::Csv, &skipping(), "s.csv").unwrap();
    assert_eq!(ds.len(), 9);
    assert_eq!(
        ds.skipped,
        SkippedRows {
            count: 3,
            first_line: Some(4)
        }
    );
    assert_eq!(
        ds.skipped.to_string(),
        "skipped 3 rows without a label (first at line 4)"
    );
    // Nothing skipped without the option: -1 is then an error.
    let err = read(csv, DataFormat::Csv, &ColumnSpec::default(), "s.csv").unwrap_err();
    assert_eq!(err, "s.csv:6: column `label`: missing value");
    let ds = read_dataset(
        b"text,label\na,0\nb,1\n",
        DataFormat::Csv,
        &skipping(),
        "s.csv",
    )
    .unwrap();
    assert_eq!(ds.skipped, SkippedRows::default());

    // Another negative integer is not "no label".
    let err = read(
        "text,label\na,0\nb,1\nc,-2\nd,1\n",
        DataFormat::Csv,
        &skipping(),
        "s.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "s.csv:4: column `label`: label -2 is not a class id (0, 1, …)"
    );
    let names = ColumnSpec {
        label_names: Some(vec!["neg".into(), "pos".into()]),
        ..skipping()
    };
    let err = read(
        "text,label\na,0\nb,1\nc,-2\nd,1\n",
        DataFormat::Csv,
        &names,
        "s.csv",
    )
    .unwrap_err();
    assert!(
        err.starts_with("s.csv:4: column `label`: label \"-2\""),
        "{err}"
    );

    // A ±1-labelled file is refused, not silently halved.
    let err = read(
        "text,label\na,1\nb,-1\nc,1\nd,-1\n",
        DataFormat::Csv,
        &skipping(),
        "pm.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "pm.csv:3: column `label`: 2 of 4 rows have no label (empty, -1 or -; first at line 3): \
         if -1 is a class here, relabel the classes 0, 1, … or give them names"
    );
    // Every row unlabelled: the same error, not "no examples".
    let err = read(
        "{\"text\": \"a\", \"label\": -1}\n",
        DataFormat::Jsonl,
        &names,
        "u.jsonl",
    )
    .unwrap_err();
    assert!(
        err.starts_with("u.jsonl:1: column `label`: 1 of 1 rows have no label"),
        "{err}"
    );
}

#[test]
fn huge_integer_labels_are_refused_and_class_counts() {
    for big in ["1000000", "4000000000", "9223372036854775807"] {
        let err = read(
            &format!("text,label\na,0\nb,{big}\nc,1\n"),
            DataFormat::Csv,
            &ColumnSpec::default(),
            "big.csv",
        )
        .unwrap_err();
        let classes = big.parse::<u64>().unwrap() as u128 + 1;
        assert_eq!(
            err,
            format!(
                "big.csv:3: column `label`: label {big}: integer labels are class ids 0, 1, …; \
                 this one would make {classes} classes"
            )
        );
    }
    // The limit itself is accepted.
    let ds = read_dataset(
        format!("text,label\na,0\nb,{}\n", MAX_CLASSES - 1).as_bytes(),
        DataFormat::Csv,
        &ColumnSpec::default(),
        "ok.csv",
    )
    .unwrap();
    assert_eq!(ds.num_labels(), MAX_CLASSES);
    let err = read(
        &format!("text,label\na,0\nb,{MAX_CLASSES}\n"),
        DataFormat::Csv,
        &ColumnSpec::default(),
        "big.csv",
    )
    .unwrap_err();
    assert!(err.starts_with("big.csv:3: "), "{err}");

    // Integer labels define every class up to the largest; counts show the gaps.
    let ds = read_dataset(
        b"text,label\na,0\nb,3\nc,3\nd,0\ne,0\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "c.csv",
    )
    .unwrap();
    assert_eq!(ds.class_counts(), vec![3, 0, 0, 2]);
    let ds = read_dataset(
        b"text\na\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "c.csv",
    )
    .unwrap();
    assert!(ds.class_counts().is_empty());
}

#[test]
fn mixed_label_kinds_are_refused_and_integral_json_floats_are_integers() {
    let err = read(
        "text,label\na,1\nb,0\nc,1\nd,0\ne,1\nf,0\ng,1\nh,positive\ni,0\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "m.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "m.csv:9: column `label`: labels mix class ids (line 2: 1) and names (line 9: positive)"
    );
    // Mostly names: the line of the odd class id.
    let err = read(
        "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": \"neg\"}\n{\"text\": \"c\", \"label\": 2}\n",
        DataFormat::Jsonl,
        &ColumnSpec::default(),
        "m.jsonl",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "m.jsonl:3: column `label`: labels mix class ids (line 3: 2) and names (line 1: pos)"
    );

    // 1 and 1.0 are one class; numbers in text columns read alike.
    let ds = read_dataset(
        b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 1.0}\n\
          {\"text\": \"c\", \"label\": 0.0}\n{\"text\": 2.50, \"label\": -0.0}\n{\"text\": 1e3, \"label\": 0}\n",
        DataFormat::Jsonl,
        &ColumnSpec::default(),
        "f.jsonl",
    )
    .unwrap();
    assert_eq!(ds.label_names, vec!["0", "1"]);
    assert_eq!(
        ds.examples
            .iter()
            .map(|e| (e.text.as_str(), e.label.unwrap()))
            .collect::<Vec<_>>(),
        vec![("a", 1), ("b", 1), ("c", 0), ("2.5", 0), ("1000", 0)]
    );
}

#[test]
fn jsonl_bom_and_nested_values() {
    let ds = read_dataset(
        "\u{feff}{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 0}\n".as_bytes(),
        DataFormat::Jsonl,
        &ColumnSpec::default(),
        "b.jsonl",
    )
    .unwrap();
    assert_eq!(ds.examples[0], ex("a", None, Some(1)));

    let err = read(
        "{\"text\": \"a\", \"label\": 1}\n{\"text\": {\"en\": \"b\"}, \"label\": 0}\n",
        DataFormat::Jsonl,
        &ColumnSpec::default(),
        "n.jsonl",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "n.jsonl:2: column `text`: expected a string, number or boolean, found an object"
    );
    let err = read(
        "{\"text\": \"a\", \"label\": [1]}\n",
        DataFormat::Jsonl,
        &ColumnSpec::default(),
        "n.jsonl",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "n.jsonl:1: column `label`: expected a string, number or boolean, found an array"
    );
    // Unused columns may hold anything.
    let ds = read_dataset(
        b"{\"text\": \"a\", \"meta\": {\"k\": [1, 2]}, \"tags\": [\"x\"], \"label\": 0}\n",
        DataFormat::Jsonl,
        &ColumnSpec::default(),
        "n.jsonl",
    )
    .unwrap();
    assert_eq!(ds.examples, vec![ex("a", None, Some(0))]);
}

#[test]
fn one_column_cannot_serve_two_roles() {
    let csv = "sentence,label\nx,1\n";
    let err = read(
        csv,
        DataFormat::Csv,
        &ColumnSpec {
            text: Some("label".into()),
            ..Default::default()
        },
        "r.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "r.csv: column `label` cannot be both the text column and the label column (detected)"
    );
    let err = read(
        csv,
        DataFormat::Csv,
        &ColumnSpec {
            text: Some("sentence".into()),
            text_pair: Some("SENTENCE".into()),
            ..Default::default()
        },
        "r.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "r.csv: column `sentence` cannot be both the text column and the text pair column"
    );
    let err = read_dataset(
        b"premise,hypothesis,label\na,b,1\n",
        DataFormat::Csv,
        &ColumnSpec {
            label: Some("hypothesis".into()),
            ..Default::default()
        },
        "r.csv",
    )
    .unwrap_err();
    assert!(
        matches!(&err, DataError::ColumnRoles { column, first: "text pair column", second: "label column", .. } if column == "hypothesis"),
        "{err}"
    );
}

#[test]
fn empty_files_and_mismatched_formats() {
    for format in [DataFormat::Csv, DataFormat::Tsv, DataFormat::Jsonl] {
        for bytes in ["", " \n\n", "\u{feff}", "\u{feff}\r\n"] {
            let err = read(bytes, format, &ColumnSpec::default(), "e.txt").unwrap_err();
            assert_eq!(err, "e.txt: the file is empty", "{format:?} {bytes:?}");
        }
    }
    let err = read(
        "premise\thypothesis\tlabel\n",
        DataFormat::Tsv,
        &ColumnSpec::default(),
        "h.tsv",
    )
    .unwrap_err();
    assert_eq!(err, "h.tsv: no examples");

    // A TSV file named .csv, and the other way round.
    let err = read(
        "sentence\tlabel\nhello\t1\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "x.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "x.csv: cannot tell which column holds the text (columns: sentence\tlabel); \
         the header looks tab-separated: is this a .tsv file?"
    );
    let err = read(
        "sentence\tlabel\nfunny, sad\t1\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "x.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "x.csv:2: 2 fields, but the header has 1 \
         (the header looks tab-separated: is this a .tsv file?)"
    );
    let err = read(
        "text,label\nhi,1\n",
        DataFormat::Tsv,
        &ColumnSpec {
            text: Some("text".into()),
            ..Default::default()
        },
        "x.tsv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "x.tsv: no column `text` (columns: text,label); \
         the header looks comma-separated: is this a .csv file?"
    );
    // A file without a header: its first row is read as the column names.
    let err = read(
        "hide new secretions from the parental units\t0\nfunny\t1\n",
        DataFormat::Tsv,
        &ColumnSpec::default(),
        "nohdr.tsv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "nohdr.tsv: cannot tell which column holds the text (columns: hide new secretions \
         from the parental units, 0); the first line looks like data, not a header: the first \
         line must name the columns (for instance `sentence` and `label`)"
    );
    let err = read(
        "{\"text\": \"hi\"}\n",
        DataFormat::Tsv,
        &ColumnSpec::default(),
        "x.tsv",
    )
    .unwrap_err();
    assert!(
        err.ends_with("the header looks like JSON: is this a JSON Lines (.jsonl) file?"),
        "{err}"
    );

    let err = read_dataset_file(write("notes.txt", "x"), &ColumnSpec::default()).unwrap_err();
    let message = err.to_string();
    for ext in [".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json"] {
        assert!(message.contains(ext), "{message}");
    }
    assert!(
        message.contains(".json means JSON Lines, one object per line"),
        "{message}"
    );
}

#[test]
fn a_json_array_is_not_json_lines() {
    let message = "a JSON array: fedsb reads JSON Lines (one object per line); \
                   convert it, e.g. with jq -c '.[]'";
    let path = write(
        "export.json",
        "\n[\n  {\"text\": \"a\", \"label\": 1},\n  {\"text\": \"b\", \"label\": 0}\n]\n",
    );
    let err = read_dataset_file(&path, &ColumnSpec::default()).unwrap_err();
    assert!(matches!(err, DataError::Syntax { line: 2, .. }), "{err:?}");
    assert!(
        err.to_string()
            .ends_with(&format!("export.json:2: {message}")),
        "{err}"
    );
    let err = read(
        "\u{feff}[{\"text\": \"a\", \"label\": 1}]",
        DataFormat::Jsonl,
        &ColumnSpec::default(),
        "one.json",
    )
    .unwrap_err();
    assert_eq!(err, format!("one.json:1: {message}"));
}

#[test]
fn texts_only_reads_no_labels() {
    // A GLUE test split: labels -1 everywhere, which a labelled read refuses.
    let tsv = "sentence\tlabel\na fine film\t-1\na dull one\t\n";
    assert!(read_dataset(
        tsv.as_bytes(),
        DataFormat::Tsv,
        &ColumnSpec::default(),
        "t.tsv"
    )
    .is_err());
    let data = read_texts_only(
        tsv.as_bytes(),
        DataFormat::Tsv,
        &ColumnSpec::default(),
        "t.tsv",
    )
    .unwrap();
    let texts: Vec<_> = data
        .examples
        .iter()
        .map(|e| (e.text.as_str(), e.label))
        .collect();
    assert_eq!(texts, [("a fine film", None), ("a dull one", None)]);
    assert_eq!(data.label_column, None);
}

/// `lines` joined with `ending` after every line.
fn with_endings(lines: &[&str], ending: &str) -> String {
    lines.iter().map(|l| format!("{l}{ending}")).collect()
}

/// Every error and the skipped-rows note name the same line whatever the
/// file's line endings: `\n`, Windows' `\r\n` or a bare `\r`.
#[test]
fn row_errors_name_the_same_line_with_every_line_ending() {
    let cases: [(DataFormat, &str, &[&str], &str); 5] = [
        // The first data row: line 2, not the header's 1.
        (
            DataFormat::Tsv,
            "t.tsv",
            &["sentence\tlabel", "fun\t-5"],
            "t.tsv:2: column `label`: label -5 is not a class id (0, 1, …)",
        ),
        (
            DataFormat::Csv,
            "c.csv",
            &["text,label", "a,1", "", "b", "c,0"],
            "c.csv:4: 1 field, but the header has 2",
        ),
        (
            DataFormat::Csv,
            "q.csv",
            &["text,label", "a,1", "\"abc,1", "foo,0"],
            "q.csv:3: 1 field, but the header has 2 (a quote opened on line 3 is never closed?)",
        ),
        // A quoted line break counts as a line.
        (
            DataFormat::Csv,
            "m.csv",
            &["text,label", "\"two", "lines\",1", "x,-4"],
            "m.csv:4: column `label`: label -4 is not a class id (0, 1, …)",
        ),
        (
            DataFormat::Jsonl,
            "j.jsonl",
            &[r#"{"text": "a", "label": 1}"#, "", r#"{"text": "#],
            "j.jsonl:3: ",
        ),
    ];
    for ending in ["\n", "\r\n", "\r"] {
        for (format, file, lines, error) in cases {
            let err = read(
                &with_endings(lines, ending),
                format,
                &ColumnSpec::default(),
                file,
            )
            .unwrap_err();
            assert!(err.starts_with(error), "{file} with {ending:?}: {err}");
        }
        let text = with_endings(
            &["text,label", "a,0", "b,1", "", "c,-", "d,1", "e,0"],
            ending,
        );
        let ds = read_dataset(text.as_bytes(), DataFormat::Csv, &skipping(), "s.csv").unwrap();
        assert_eq!(ds.skipped.first_line, Some(5), "{ending:?}");
    }
}

#[test]
fn carriage_return_only_line_endings_read_like_newlines() {
    let files = [
        (
            DataFormat::Csv,
            "c.csv",
            &["sentence,label", "\"fun, witty\",1", "", "dull,0"][..],
        ),
        (
            DataFormat::Tsv,
            "t.tsv",
            &["sentence\tlabel", "fun, witty\t1", "", "dull\t0"],
        ),
        (
            DataFormat::Jsonl,
            "j.jsonl",
            &[
                r#"{"sentence": "fun, witty", "label": 1}"#,
                "",
                r#"{"sentence": "dull", "label": 0}"#,
            ],
        ),
    ];
    let want = vec![ex("fun, witty", None, Some(1)), ex("dull", None, Some(0))];
    for (format, file, lines) in files {
        for ending in ["\n", "\r\n", "\r"] {
            let got = read(&with_endings(lines, ending), format, &skipping(), file);
            assert_eq!(got, Ok(want.clone()), "{file} with {ending:?}");
        }
        // No line ending after the last line.
        let text = with_endings(lines, "\r");
        let got = read(text.trim_end(), format, &skipping(), file);
        assert_eq!(got, Ok(want.clone()), "{file} without a last \\r");
    }

    // Errors count lines by the \r.
    let csv = read(
        "text,label\ra,1\rb\rc,0\r",
        DataFormat::Csv,
        &skipping(),
        "c.csv",
    );
    assert_eq!(csv.unwrap_err(), "c.csv:3: 1 field, but the header has 2");
    let bom = "\u{feff}text,label\ra,1\rb\r";
    let csv = read(bom, DataFormat::Csv, &skipping(), "c.csv");
    assert_eq!(csv.unwrap_err(), "c.csv:3: 1 field, but the header has 2");
    let tsv = read(
        "text\tlabel\r\ra\t1\rb\t-7\r",
        DataFormat::Tsv,
        &skipping(),
        "t.tsv",
    );
    assert_eq!(
        tsv.unwrap_err(),
        "t.tsv:4: column `label`: label -7 is not a class id (0, 1, …)"
    );
    let jsonl = read(
        "{\"text\": \"a\", \"label\": 1}\r\r{\"text\": \r",
        DataFormat::Jsonl,
        &skipping(),
        "j.jsonl",
    );
    assert!(
        jsonl.as_ref().unwrap_err().starts_with("j.jsonl:3: "),
        "{jsonl:?}"
    );
    let err = read(
        "text,label\r\"abc,1\rfoo,0\rbar,1\r",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "q.csv",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "q.csv:2: 1 field, but the header has 2 (a quote opened on line 2 is never closed?)"
    );
    // A quoted field keeps its line break as it is.
    let ds = read(
        "text,label\r\"two\rlines\",1\r",
        DataFormat::Csv,
        &skipping(),
        "m.csv",
    );
    assert_eq!(ds, Ok(vec![ex("two\rlines", None, Some(1))]));

    // In a file with \n, a \r inside a line is no line break for JSON Lines
    // (JSON allows it between tokens).
    let ds = read(
        "{\"text\": \"a\",\r \"label\": 1}\n",
        DataFormat::Jsonl,
        &skipping(),
        "j.jsonl",
    );
    assert_eq!(ds, Ok(vec![ex("a", None, Some(1))]));
}

#[test]
fn bytes_that_are_not_utf8_are_errors_naming_line_and_offset() {
    let bad = |bytes: &[u8], format: DataFormat, file: &str| {
        read_dataset(bytes, format, &ColumnSpec::default(), file).unwrap_err()
    };
    // Latin-1 "café" on line 3, at byte 23 of the file.
    let err = bad(
        b"sentence,label\nok,1\ncaf\xe9,0\n",
        DataFormat::Csv,
        "l.csv",
    );
    assert_eq!(
        err.to_string(),
        "l.csv:3: not valid UTF-8 (byte 0xe9 at offset 23); save the file as UTF-8"
    );
    assert!(
        matches!(
            err,
            DataError::NotUtf8 {
                line: 3,
                offset: 23,
                byte: 0xe9,
                ..
            }
        ),
        "{err:?}"
    );
    // In the header, in the last field, in a CR-only file, after a BOM (the
    // offset counts it: it is the file's).
    let err = bad(b"sentence\tlab\xffel\nok\t1\n", DataFormat::Tsv, "h.tsv");
    assert!(
        err.to_string()
            .starts_with("h.tsv:1: not valid UTF-8 (byte 0xff at offset 12)"),
        "{err}"
    );
    let err = bad(
        b"sentence\tlabel\r\rok\t1\rno\t0\xc3\r",
        DataFormat::Tsv,
        "r.tsv",
    );
    assert!(
        err.to_string()
            .starts_with("r.tsv:4: not valid UTF-8 (byte 0xc3 at offset 25)"),
        "{err}"
    );
    let err = bad(
        b"\xef\xbb\xbf{\"text\": \"a\", \"label\": 1}\r\n{\"text\": \"\x80\", \"label\": 0}\r\n",
        DataFormat::Jsonl,
        "b.jsonl",
    );
    assert!(
        err.to_string()
            .starts_with("b.jsonl:2: not valid UTF-8 (byte 0x80 at offset 40)"),
        "{err}"
    );
    // A UTF-8 sequence cut off at the end of the file.
    let err = bad(b"text,label\na,1\n\xe2\x82", DataFormat::Csv, "e.csv");
    assert!(
        err.to_string()
            .starts_with("e.csv:3: not valid UTF-8 (byte 0xe2 at offset 15)"),
        "{err}"
    );
    // Texts only reads the same way.
    let err = read_texts_only(
        b"text\n\xff\n",
        DataFormat::Csv,
        &ColumnSpec::default(),
        "t.csv",
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DataError::NotUtf8 {
                line: 2,
                offset: 5,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn plain_text_lines() {
    let want = vec!["first".to_owned(), "  second ".into(), "third".into()];
    for ending in ["\n", "\r\n", "\r"] {
        let text = with_endings(&["\u{feff}first", "", "  second ", " ", "third"], ending);
        assert_eq!(
            read_text_lines(text.as_bytes(), "t.txt").unwrap(),
            want,
            "{ending:?}"
        );
        let text = text.trim_end_matches(ending);
        assert_eq!(
            read_text_lines(text.as_bytes(), "t.txt").unwrap(),
            want,
            "{ending:?}"
        );
    }
    assert!(read_text_lines(b"\n \r\n", "t.txt").unwrap().is_empty());
    let err = read_text_lines(b"one\rtw\xf0o\r", "m.txt").unwrap_err();
    assert_eq!(
        err.to_string(),
        "m.txt:2: not valid UTF-8 (byte 0xf0 at offset 6); save the file as UTF-8"
    );
}

/// Integer labels read against named classes are positions in the names,
/// and the dataset says so with the mapping; labels matched by name, or
/// classes named by the integers themselves, need no note.
#[test]
fn class_ids_read_as_named_classes_are_noted() {
    let named = |names: &[&str]| ColumnSpec {
        label_names: Some(names.iter().map(|n| n.to_string()).collect()),
        ..Default::default()
    };
    let mnli = named(&["contradiction", "entailment", "neutral"]);
    let ds = read_dataset(b"text,label\na,0\nb,2\n", DataFormat::Csv, &mnli, "d.csv").unwrap();
    assert_eq!(
        ds.examples.iter().map(|e| e.label).collect::<Vec<_>>(),
        [Some(0), Some(2)]
    );
    assert!(ds.labels_were_ids);
    assert_eq!(
        ds.class_ids_note().as_deref(),
        Some("labels are class ids, read in the order of the classes: 0 = contradiction, 1 = entailment, 2 = neutral")
    );
    for (text, spec) in [
        ("text,label\na,neutral\nb,entailment\n", &mnli),
        ("text,label\na,0\nb,1\n", &named(&["0", "1"])),
        ("text,label\na,0\nb,1\n", &ColumnSpec::default()),
    ] {
        let ds = read_dataset(text.as_bytes(), DataFormat::Csv, spec, "d.csv").unwrap();
        assert!(!ds.labels_were_ids, "{text}");
        assert_eq!(ds.class_ids_note(), None);
    }
}
