//! `fedsb embed` on a tiny random model: single texts and the sentence
//! pairs of a dataset file, each against the CPU reference encoder.

use std::process::Command;

use anyhow::Context;
use fedsb_e2e::process::check_success;
use fedsb_e2e::tiny_model::write_tiny_model;
use fedsb_e2e::*;
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::ReferenceEncoder;

/// The mean-pooled embedding of one input by the CPU reference.
fn reference(
    weights: &BertWeights,
    tokenizer: &BertTokenizer,
    input: (&str, Option<&str>),
) -> anyhow::Result<Vec<f32>> {
    let batch = tokenizer.encode_mixed_batch(&[input])?;
    Ok(ReferenceEncoder::new(weights, None)
        .mean_pooled(&batch)
        .data
        .clone())
}

fn embedding(line: &serde_json::Value) -> anyhow::Result<Vec<f32>> {
    line["embedding"]
        .as_array()
        .context("embedding")?
        .iter()
        .map(|x| x.as_f64().map(|x| x as f32).context("a number"))
        .collect()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A file of sentence pairs is embedded pair by pair (`[CLS] a [SEP] b
/// [SEP]`), each line naming both texts, not as its first column alone.
#[test]
fn a_file_of_sentence_pairs_is_embedded_as_pairs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    write_tiny_model(&d.join("model"), 3)?;
    let weights = BertWeights::from_dir(d.join("model"))?;
    let tokenizer = BertTokenizer::from_file(d.join("model/tokenizer.json"))?;
    let pairs = [
        ("good movie", "it was great"),
        ("bad plot", "nice actors , though"),
        ("love it", "happy"),
    ];
    let mut tsv = String::from("premise\thypothesis\tlabel\n");
    for (a, b) in pairs {
        tsv.push_str(&format!("{a}\t{b}\tentailment\n"));
    }
    std::fs::write(d.join("pairs.tsv"), tsv)?;

    let embed = |extra: &[&str]| -> anyhow::Result<Vec<serde_json::Value>> {
        let out = Command::new(fedsb_bin())
            .arg("embed")
            .arg("--model")
            .arg(d.join("model"))
            .args(extra)
            .args(["--batch", "2"])
            .current_dir(d)
            .env("RUST_LOG", "warn")
            .output()?;
        check_success("fedsb embed", &out)?;
        String::from_utf8(out.stdout)?
            .lines()
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    };

    let lines = embed(&["--input", "pairs.tsv"])?;
    assert_eq!(lines.len(), pairs.len());
    for (line, (a, b)) in lines.iter().zip(pairs) {
        assert_eq!(
            (line["text"].as_str(), line["text_pair"].as_str()),
            (Some(a), Some(b))
        );
        let want = reference(&weights, &tokenizer, (a, Some(b)))?;
        let diff = max_difference(&embedding(line)?, &want);
        assert!(diff <= 1e-4, "{a} / {b}: {diff}");
        let alone = reference(&weights, &tokenizer, (a, None))?;
        assert!(
            max_difference(&want, &alone) > 1e-3,
            "{a}: the pair changes nothing"
        );
    }

    // The columns can be named; single texts carry no text_pair.
    let named = embed(&[
        "--input",
        "pairs.tsv",
        "--text-column",
        "hypothesis",
        "--text-pair-column",
        "premise",
    ])?;
    assert_eq!(named[0]["text"], "it was great");
    assert_eq!(named[0]["text_pair"], "good movie");
    let single = embed(&["--text", "good movie"])?;
    assert!(single[0].get("text_pair").is_none(), "{}", single[0]);
    let want = reference(&weights, &tokenizer, ("good movie", None))?;
    assert!(max_difference(&embedding(&single[0])?, &want) <= 1e-4);
    Ok(())
}
