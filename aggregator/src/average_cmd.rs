//! `fedsb average`: the mean of adapter files that share their frozen `A`
//! and `B`, such as `fedsb train --checkpoint-every`'s checkpoints or a
//! task's rounds written by `fedsb export`. Every `lora_R` and the head
//! (`classifier.*`) are averaged in f64 and written as F32; every other
//! tensor (each module's `lora_A` and `lora_B`) must be bit for bit the same
//! in every file and is copied. With `A` and `B` shared, `B·mean(R)·A` is
//! the mean of the files' updates `B·R·A`, so the result is the mean of
//! their models, as `fedsb export --average` makes it from stored rounds.
//!
//! Files whose tensors, shapes, dtypes, `A`, `B`, class names or recorded
//! base models (`base_model_sha256`) differ are refused, naming the file
//! and the first difference. Metadata keys with the same value in every
//! file are kept (the base model only when every file records it); the
//! others (the step, the round) are dropped, and `averaged_files` lists the
//! inputs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::checks::check_output_file;
use crate::participant::{with_sorted_header, write_file_atomically, BASE_MODEL_SHA256};

#[derive(Debug, Args)]
pub struct AverageArgs {
    /// Adapter files to average (safetensors in the layout of `fedsb init`,
    /// `fedsb train --output` and `fedsb export`), all with the same A and B.
    #[arg(required = true, num_args = 1.., value_name = "ADAPTER_FILE")]
    files: Vec<PathBuf>,
    /// Where to write the mean.
    #[arg(long)]
    out: PathBuf,
}

/// Whether a tensor is trained (averaged) rather than frozen (copied).
fn is_trained(name: &str) -> bool {
    name.ends_with(".lora_R") || name.starts_with("classifier.")
}

/// One input file: its name for messages, its tensors and metadata.
struct Input<'a> {
    name: String,
    tensors: SafeTensors<'a>,
    metadata: HashMap<String, String>,
}

/// Refuses inputs that record different base models: their `A` and `B`
/// come from different models' gradients, and their mean means nothing on
/// either. Files that record none are not compared.
fn check_base_models(inputs: &[Input<'_>]) -> anyhow::Result<()> {
    let mut recorded = inputs
        .iter()
        .filter_map(|i| i.metadata.get(BASE_MODEL_SHA256).map(|sha| (i, sha)));
    let Some((first, sha)) = recorded.next() else {
        return Ok(());
    };
    if let Some((other, theirs)) = recorded.find(|(_, s)| !s.eq_ignore_ascii_case(sha)) {
        bail!(
            "{} was made for the base model with SHA-256 {theirs} but {} for the one with \
             {sha} ({BASE_MODEL_SHA256} in their metadata): only adapters of one base model \
             can be averaged",
            other.name,
            first.name
        );
    }
    Ok(())
}

/// The mean of `inputs` as the bytes of a safetensors file.
fn mean_file(inputs: &[Input<'_>]) -> anyhow::Result<Vec<u8>> {
    let first = &inputs[0];
    check_base_models(inputs)?;
    let sorted_names = |t: &SafeTensors<'_>| {
        let mut names: Vec<String> = t.names().into_iter().map(str::to_owned).collect();
        names.sort();
        names
    };
    let names = sorted_names(&first.tensors);
    for input in &inputs[1..] {
        let theirs = sorted_names(&input.tensors);
        if let Some(missing) = names.iter().find(|n| !theirs.contains(n)) {
            bail!(
                "{} has no tensor {missing} ({} has)",
                input.name,
                first.name
            );
        }
        if let Some(extra) = theirs.iter().find(|n| !names.contains(n)) {
            bail!(
                "{} has a tensor {extra} that {} has not",
                input.name,
                first.name
            );
        }
    }
    let labels = first.metadata.get("labels");
    for input in &inputs[1..] {
        let theirs = input.metadata.get("labels");
        if theirs != labels {
            bail!(
                "{} has the classes {} but {} has {}: their heads do not mean the same",
                input.name,
                theirs.map_or("(none)", String::as_str),
                first.name,
                labels.map_or("(none)", String::as_str)
            );
        }
    }
    let count = inputs.len() as f64;
    let mut data: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::with_capacity(names.len());
    for name in &names {
        let view = first.tensors.tensor(name)?;
        for input in &inputs[1..] {
            let other = input.tensors.tensor(name)?;
            if other.shape() != view.shape() || other.dtype() != view.dtype() {
                bail!(
                    "tensor {name} is {:?} {:?} in {} but {:?} {:?} in {}",
                    other.dtype(),
                    other.shape(),
                    input.name,
                    view.dtype(),
                    view.shape(),
                    first.name
                );
            }
        }
        if !is_trained(name) {
            if let Some(input) = inputs[1..]
                .iter()
                .find(|i| i.tensors.tensor(name).map(|t| t.data()).ok() != Some(view.data()))
            {
                bail!(
                    "tensor {name} of {} differs from {}'s: only files with the same frozen \
                     A and B (one initialization) can be averaged",
                    input.name,
                    first.name
                );
            }
            data.push((
                name.clone(),
                view.shape().to_vec(),
                view.dtype(),
                view.data().to_vec(),
            ));
            continue;
        }
        if view.dtype() != Dtype::F32 {
            bail!(
                "tensor {name} of {} is {:?}; fedsb adapter files hold F32",
                first.name,
                view.dtype()
            );
        }
        let mut sum = vec![0f64; view.data().len() / 4];
        for input in inputs {
            let t = input.tensors.tensor(name)?;
            for (s, b) in sum.iter_mut().zip(t.data().chunks_exact(4)) {
                let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if !x.is_finite() {
                    bail!("tensor {name} of {} holds {x}", input.name);
                }
                *s += f64::from(x);
            }
        }
        let bytes = sum
            .iter()
            .flat_map(|&s| ((s / count) as f32).to_le_bytes())
            .collect();
        data.push((name.clone(), view.shape().to_vec(), Dtype::F32, bytes));
    }
    // Keys every file agrees on, then the inputs.
    let mut metadata: BTreeMap<String, String> = first
        .metadata
        .iter()
        .filter(|(k, v)| inputs[1..].iter().all(|i| i.metadata.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let files: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    metadata.insert("averaged_files".into(), serde_json::to_string(&files)?);
    metadata.insert("written_by".into(), "fedsb average".into());
    let views = data
        .iter()
        .map(|(name, shape, dtype, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    // safetensors writes the metadata in a HashMap's order; sorted, equal
    // inputs give equal bytes.
    Ok(with_sorted_header(safetensors::serialize(
        views,
        Some(metadata),
    )?)?)
}

pub fn run(args: AverageArgs) -> anyhow::Result<()> {
    // Never write the mean over one of the files it is made of, and find a
    // missing directory before the files are read.
    let inputs: Vec<(&str, &Path)> = args
        .files
        .iter()
        .map(|f| ("the input", f.as_path()))
        .collect();
    check_output_file(&args.out, "--out", &inputs)?;
    let bytes: Vec<(String, Vec<u8>)> = args
        .files
        .iter()
        .map(|p| {
            let name = p.display().to_string();
            let b = std::fs::read(p).with_context(|| format!("reading {name}"))?;
            Ok((name, b))
        })
        .collect::<anyhow::Result<_>>()?;
    let inputs = bytes
        .iter()
        .map(|(name, b)| {
            let (_, meta) = SafeTensors::read_metadata(b)
                .with_context(|| format!("{name} is not a safetensors file"))?;
            let tensors = SafeTensors::deserialize(b)
                .with_context(|| format!("{name} is not a safetensors file"))?;
            Ok(Input {
                name: name.clone(),
                tensors,
                metadata: meta.metadata().clone().unwrap_or_default(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !inputs
        .iter()
        .any(|i| i.tensors.names().iter().any(|n| n.ends_with(".lora_R")))
    {
        bail!(
            "{} has no lora_R tensor: not an adapter file",
            inputs[0].name
        );
    }
    let out = mean_file(&inputs)?;
    write_file_atomically(&args.out, &out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote the mean of {} adapter files to {}",
        inputs.len(),
        args.out.display()
    );
    println!(
        "{}",
        serde_json::json!({
            "files": inputs.iter().map(|i| &i.name).collect::<Vec<_>>(),
            "out": args.out.display().to_string(),
            "sha256": hex::encode(Sha256::digest(&out)),
            "bytes": out.len(),
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-tensor adapter file with `metadata`.
    fn file_bytes(metadata: &[(&str, &str)]) -> Vec<u8> {
        let data = 1f32.to_le_bytes();
        let view = TensorView::new(Dtype::F32, vec![1, 1], &data).unwrap();
        let metadata = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        safetensors::serialize(
            [("encoder.layer.0.output.dense.lora_R", view)],
            Some(metadata),
        )
        .unwrap()
    }

    fn input<'a>(name: &str, bytes: &'a [u8]) -> Input<'a> {
        let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
        Input {
            name: name.to_owned(),
            tensors: SafeTensors::deserialize(bytes).unwrap(),
            metadata: meta.metadata().clone().unwrap_or_default(),
        }
    }

    /// Files recording different base models are refused, naming both; the
    /// base model is kept when every file records the same one, and
    /// dropped when one records none.
    #[test]
    fn files_of_different_base_models_are_refused() {
        let (m1, m2) = ("1a".repeat(32), "9f".repeat(32));
        let a = file_bytes(&[(BASE_MODEL_SHA256, &m1)]);
        let b = file_bytes(&[(BASE_MODEL_SHA256, &m2)]);
        let none = file_bytes(&[]);
        let err = mean_file(&[input("a.safetensors", &a), input("b.safetensors", &b)])
            .unwrap_err()
            .to_string();
        for part in [
            format!("b.safetensors was made for the base model with SHA-256 {m2}"),
            format!("but a.safetensors for the one with {m1}"),
        ] {
            assert!(err.contains(&part), "{part:?} not in {err}");
        }
        let metadata_of = |bytes: &[u8]| input("out", bytes).metadata;
        let same = mean_file(&[input("a", &a), input("a2", &a)]).unwrap();
        assert_eq!(metadata_of(&same).get(BASE_MODEL_SHA256), Some(&m1));
        let mixed = mean_file(&[input("a", &a), input("none", &none)]).unwrap();
        assert_eq!(metadata_of(&mixed).get(BASE_MODEL_SHA256), None);
    }
}
