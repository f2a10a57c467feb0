//! Reading datasets (CSV, TSV, JSONL) from small generated files: column
//! detection, sentence pairs, integer and string labels, and errors that
//! name the file, line and column.

use std::path::PathBuf;

use fedsb_engine::data::{
    read_dataset, read_dataset_file, ColumnSpec, DataError, DataFormat, Example,
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

    let err = csv("sentence,label\nok,1\nshort\n", &none);
    assert_eq!(
        err.to_string(),
        "train.csv:3: column `label`: missing value"
    );
    assert!(matches!(err, DataError::Value { line: 3, .. }));

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
