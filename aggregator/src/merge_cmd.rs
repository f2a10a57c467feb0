//! `fedsb merge`: an adapter file merged into its base model, saved as a
//! plain Hugging Face model directory that needs no fedsb to run.
//!
//! Every adapted linear's weight becomes `W + B·R·A` (summed in f64,
//! written as F32); every other tensor of the base `model.safetensors`
//! (embeddings, LayerNorms, biases, the pooler, under the checkpoint's own
//! names and dtypes) is copied unchanged. The directory also gets the base
//! model's configuration and tokenizer files and its sentence-transformers
//! module folders (`1_Pooling`, …), but no other weight files, no hidden
//! files and no model card, which would describe the base model. The classification head,
//! which reads the attention-masked mean of the last hidden state, is
//! written beside it as `fedsb-head.safetensors` (`classifier.weight`,
//! `classifier.bias`, the class names in its metadata), and a `README.md`
//! model card says what the directory is and how to run it. An adapter
//! file that records another base model (`base_model_sha256`) than
//! `--model`'s is refused before anything is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::checks::{check_output_dir, load_base_model};
use crate::participant::{adapter_file_info, read_adapter_file, read_head};

/// The merged model's file names.
const MODEL_FILE: &str = "model.safetensors";
const HEAD_FILE: &str = "fedsb-head.safetensors";
/// A PEFT adapter's file names (`fedsb merge --peft`).
const PEFT_CONFIG_FILE: &str = "adapter_config.json";
const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model the adapter was trained on (Hugging Face directory:
    /// config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The adapter file (from `fedsb export`, `fedsb train --output` or
    /// `fedsb init`).
    #[arg(long)]
    adapter_file: PathBuf,
    /// The directory to write: a new one (its parents are created) or an
    /// empty one; never one that holds files. It appears whole or not at
    /// all: the files are written into a temporary directory beside it,
    /// which is renamed at the end.
    #[arg(long)]
    out: PathBuf,
    /// Write a Hugging Face PEFT LoRA adapter instead of a merged model:
    /// `adapter_config.json` and `adapter_model.safetensors` with
    /// `lora_A` = R·A and `lora_B` = B for every adapted module and
    /// `lora_alpha` = r (so PEFT's scale is 1 and `lora_B·lora_A` is
    /// B·R·A), for the base model as transformers' `AutoModel` loads it;
    /// the head and a model card beside them.
    #[arg(long)]
    peft: bool,
}

/// Weight files of other formats that a merged directory must not carry
/// over from the base model (they would hold the base weights).
fn is_weight_file(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".h5",
        ".msgpack",
        ".onnx",
        ".ot",
        ".pt",
        ".pth",
        ".gguf",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
}

/// Copies the base model's configuration, tokenizer and sentence-transformers
/// module folders (`<n>_<Name>`) into `out`; returns what was copied.
fn copy_model_files(model: &Path, out: &Path) -> anyhow::Result<Vec<String>> {
    let mut copied = Vec::new();
    let entries =
        std::fs::read_dir(model).with_context(|| format!("reading {}", model.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_file() {
            if is_weight_file(&name)
                || name.starts_with('.')
                || name.eq_ignore_ascii_case("README.md")
            {
                continue;
            }
            std::fs::copy(&path, out.join(&name))
                .with_context(|| format!("copying {}", path.display()))?;
            copied.push(name);
        } else if path.is_dir()
            && name
                .split_once('_')
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        {
            let dir = out.join(&name);
            std::fs::create_dir_all(&dir)?;
            for f in std::fs::read_dir(&path)? {
                let f = f?;
                let fname = f.file_name().to_string_lossy().into_owned();
                if f.path().is_file() && !is_weight_file(&fname) {
                    std::fs::copy(f.path(), dir.join(&fname))
                        .with_context(|| format!("copying {}", f.path().display()))?;
                }
            }
            copied.push(format!("{name}/"));
        }
    }
    copied.sort();
    Ok(copied)
}

/// The merged directory's `README.md`: what it is made of (the base model,
/// the adapter file and its metadata) and how to run it with transformers.
fn model_card(
    args: &MergeArgs,
    info: &crate::participant::AdapterFileInfo,
    classes: Option<usize>,
) -> String {
    use std::fmt::Write as _;
    let mut card = String::from("# A LoRA-SB model merged by fedsb\n\n");
    let _ = writeln!(
        card,
        "This directory is the base model `{}` with the LoRA-SB adapter `{}` \
         merged into it by `fedsb merge`: every adapted linear layer's weight \
         is `W + B·R·A` ({} modules, rank {}); every other tensor, the \
         configuration and the tokenizer are the base model's.\n",
        args.model.display(),
        args.adapter_file.display(),
        info.names.len(),
        info.rank
    );
    if !info.metadata.is_empty() {
        card.push_str("The adapter file's metadata:\n\n| key | value |\n|---|---|\n");
        let mut keys: Vec<_> = info.metadata.iter().collect();
        keys.sort();
        for (k, v) in keys {
            let _ = writeln!(card, "| {k} | {} |", v.replace('|', "\\|"));
        }
        card.push('\n');
    }
    if let Some(classes) = classes {
        head_paragraph(&mut card, info, classes);
        card.push_str(
            "```python\n\
             import torch\n\
             from safetensors.torch import load_file\n\
             from transformers import AutoModel, AutoTokenizer\n\n\
             DIR = \".\"  # this directory\n\
             model = AutoModel.from_pretrained(DIR).eval()\n\
             tokenizer = AutoTokenizer.from_pretrained(DIR)\n",
        );
        card.push_str(HEAD_SNIPPET);
    }
    card
}

/// A model card's paragraph on the head: its file, classes and pooling.
fn head_paragraph(card: &mut String, info: &crate::participant::AdapterFileInfo, classes: usize) {
    use std::fmt::Write as _;
    let labels = info
        .metadata
        .get("labels")
        .map_or("(not named)", String::as_str);
    let _ = writeln!(
        card,
        "The classification head is `{HEAD_FILE}` ({classes} classes, in order: \
         {labels}): `logits = mean · Wᵀ + b`, where `mean` is the \
         attention-masked mean of the last hidden state.\n"
    );
}

/// The end of the model cards' Python snippets, once `model`, `tokenizer`
/// and `DIR` are set: the head on the attention-masked mean.
const HEAD_SNIPPET: &str = "head = load_file(f\"{DIR}/fedsb-head.safetensors\")\n\
    enc = tokenizer([\"a sentence\"], padding=True, truncation=True, return_tensors=\"pt\")\n\
    with torch.no_grad():\n\
    \x20   hidden = model(**enc).last_hidden_state\n\
    mask = enc[\"attention_mask\"].unsqueeze(-1).float()\n\
    mean = (hidden * mask).sum(1) / mask.sum(1)\n\
    logits = mean @ head[\"classifier.weight\"].T + head[\"classifier.bias\"]\n\
    ```\n";

/// `fedsb-head.safetensors`: the head, its pooling and class names.
fn head_file(
    head: &fedsb_engine::reference::ClassifierHead<f32>,
    info: &crate::participant::AdapterFileInfo,
) -> anyhow::Result<Vec<u8>> {
    let data = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (w, b) = (data(&head.weight.data), data(&head.bias));
    let views = vec![
        (
            "classifier.weight",
            TensorView::new(Dtype::F32, vec![head.weight.rows, head.weight.cols], &w)?,
        ),
        (
            "classifier.bias",
            TensorView::new(Dtype::F32, vec![head.bias.len()], &b)?,
        ),
    ];
    let mut meta = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        (
            "pooling".to_owned(),
            "attention-masked mean of the last hidden state".to_owned(),
        ),
    ]);
    if let Some(labels) = info.metadata.get("labels") {
        meta.insert("labels".to_owned(), labels.clone());
    }
    Ok(safetensors::tensor::serialize(views, Some(meta))?)
}

/// Writes `files` (and, with `model`, the base model's configuration and
/// tokenizer files) into a staging directory beside `out` and renames it
/// to `out`, so that `out` appears whole or not at all; returns what was
/// copied from `model`.
fn write_dir(
    out: &Path,
    files: &[(&str, Vec<u8>)],
    model: Option<&Path>,
) -> anyhow::Result<Vec<String>> {
    let staging = staging_dir(out)?;
    let written = (|| {
        let copied = match model {
            Some(model) => copy_model_files(model, &staging)?,
            None => Vec::new(),
        };
        for (name, bytes) in files {
            write_file(&staging.join(name), bytes)?;
        }
        // Onto a new path, or over the empty directory `out`.
        std::fs::rename(&staging, out).with_context(|| format!("writing {}", out.display()))?;
        Ok::<_, anyhow::Error>(copied)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written
}

/// `fedsb merge --peft`: the adapter as a Hugging Face PEFT LoRA adapter.
/// LoRA-SB's `B·R·A` is LoRA's `lora_B·lora_A` with `lora_A = R·A` (r × in)
/// and `lora_B = B` (out × r), at PEFT's scale `lora_alpha / r` = 1. The
/// keys are those PEFT saves for a `BertModel` (`AutoModel`):
/// `base_model.model.<module>.lora_A.weight`, and `target_modules` lists
/// every adapted module by its full name, so that only those are adapted
/// (PEFT matches a name or a suffix after a dot: `output.dense` alone
/// would also match `attention.output.dense`).
fn write_peft(
    args: &MergeArgs,
    out: &Path,
    bytes: &[u8],
    info: &crate::participant::AdapterFileInfo,
    adapters: &fedsb_engine::reference::LoraSbAdapters<f32>,
    hidden: usize,
) -> anyhow::Result<()> {
    let file = args.adapter_file.display().to_string();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, &(layer, which)) in info.names.iter().zip(&info.modules) {
        let m = adapters.layers[layer][which.index()]
            .as_ref()
            .with_context(|| format!("adapter file {file}: no module {name}"))?;
        let (r, ins) = (m.a.rows, m.a.cols);
        // R·A in f64, written as F32.
        let mut ra = vec![0f32; r * ins];
        for i in 0..r {
            for j in 0..ins {
                let sum: f64 = (0..r)
                    .map(|k| f64::from(m.r.data[i * r + k]) * f64::from(m.a.data[k * ins + j]))
                    .sum();
                ra[i * ins + j] = sum as f32;
            }
        }
        let le = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        tensors.push((
            format!("base_model.model.{name}.lora_A.weight"),
            vec![r, ins],
            le(&ra),
        ));
        tensors.push((
            format!("base_model.model.{name}.lora_B.weight"),
            vec![m.b.rows, m.b.cols],
            le(&m.b.data),
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.as_str(), v))
                .with_context(|| format!("tensor {name}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let weights = safetensors::tensor::serialize(
        views,
        Some(HashMap::from([("format".to_owned(), "pt".to_owned())])),
    )?;
    let base = args
        .model
        .canonicalize()
        .unwrap_or_else(|_| args.model.clone());
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base.display().to_string(),
        "r": info.rank,
        "lora_alpha": info.rank,
        "lora_dropout": 0.0,
        "target_modules": info.names,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    let head = match info.head_classes {
        Some(classes) => {
            read_head(bytes, classes, hidden).with_context(|| format!("adapter file {file}"))?
        }
        None => None,
    };
    info.labels()
        .with_context(|| format!("adapter file {file}"))?;
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        (PEFT_CONFIG_FILE, serde_json::to_vec_pretty(&config)?),
        (PEFT_WEIGHTS_FILE, weights),
    ];
    if let Some(head) = &head {
        files.push((HEAD_FILE, head_file(head, info)?));
    }
    let card = peft_card(args, info, &base, head.as_ref().map(|h| h.bias.len()));
    files.push(("README.md", card.into_bytes()));
    write_dir(out, &files, None)?;
    eprintln!(
        "wrote the PEFT LoRA adapter of {} modules of rank {} for {} to {}",
        info.names.len(),
        info.rank,
        base.display(),
        args.out.display()
    );
    println!(
        "{}",
        serde_json::json!({
            "out": args.out.display().to_string(),
            "format": "peft",
            "modules": info.names.len(),
            "rank": info.rank,
            "tensors": tensors.len(),
            "head": head.is_some().then_some(HEAD_FILE),
            "base_model": base.display().to_string(),
        })
    );
    Ok(())
}

/// The PEFT directory's `README.md`: what it is and how to run it with
/// transformers and PEFT.
fn peft_card(
    args: &MergeArgs,
    info: &crate::participant::AdapterFileInfo,
    base: &Path,
    classes: Option<usize>,
) -> String {
    use std::fmt::Write as _;
    let mut card = String::from("# A LoRA-SB adapter in PEFT's LoRA format, by fedsb\n\n");
    let _ = writeln!(
        card,
        "This directory is the LoRA-SB adapter `{}` ({} modules, rank {}) as a \
         Hugging Face PEFT LoRA adapter for the base model `{}` loaded with \
         `transformers.AutoModel`, written by `fedsb merge --peft`: \
         `lora_A` = R·A and `lora_B` = B, with `lora_alpha` = r, so that each \
         adapted linear adds `B·R·A·x`.\n",
        args.adapter_file.display(),
        info.names.len(),
        info.rank,
        base.display()
    );
    if let Some(classes) = classes {
        head_paragraph(&mut card, info, classes);
    }
    let _ = write!(
        card,
        "```python\n\
         import torch\n\
         from peft import PeftModel\n\
         from safetensors.torch import load_file\n\
         from transformers import AutoModel, AutoTokenizer\n\n\
         BASE = {base:?}\n\
         DIR = \".\"  # this directory\n\
         model = PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), DIR).eval()\n\
         tokenizer = AutoTokenizer.from_pretrained(BASE)\n",
        base = base.display().to_string()
    );
    card.push_str(match classes {
        Some(_) => HEAD_SNIPPET,
        // Without a head: the adapted encoder's last hidden state.
        None => {
            "enc = tokenizer([\"a sentence\"], padding=True, truncation=True, return_tensors=\"pt\")\n\
             with torch.no_grad():\n\
             \x20   hidden = model(**enc).last_hidden_state\n\
             ```\n"
        }
    });
    card
}

/// Where the merged directory goes: `out` itself when it is new or an
/// empty directory (made absolute, so that `.` works); refused when it is a
/// file or holds anything, so that no file of the user's is ever replaced.
fn output_dir(out: &Path) -> anyhow::Result<PathBuf> {
    if !out.exists() {
        if out.file_name().is_none() {
            bail!("--out {} names no directory", out.display());
        }
        return Ok(out.to_owned());
    }
    // A file, or a directory holding anything: fedsb merge never writes
    // over files.
    check_output_dir(out, "--out")?;
    out.canonicalize()
        .with_context(|| format!("resolving {}", out.display()))
}

/// A temporary directory beside `out`, named after it and this process.
fn staging_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("--out {} names no directory", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.merging-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the leftover {}", staging.display()))?;
    }
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    Ok(staging)
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let file = args.adapter_file.display().to_string();
    let out = output_dir(&args.out)?;
    let (weights, base_model) = load_base_model(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let config = &weights.config;
    let bytes = std::fs::read(&args.adapter_file).with_context(|| format!("reading {file}"))?;
    let info = adapter_file_info(&bytes, config.num_hidden_layers)
        .with_context(|| format!("adapter file {file}"))?;
    base_model.check_adapter_file(&args.adapter_file, &info.metadata)?;
    let adapters = read_adapter_file(&bytes, &info.names, &info.modules, config, info.rank)
        .with_context(|| format!("adapter file {file}"))?;
    if args.peft {
        return write_peft(&args, &out, &bytes, &info, &adapters, config.hidden_size);
    }
    let merged = adapters.merged_into(&weights);

    // The base checkpoint's tensors, the adapted weights replaced.
    let base_path = args.model.join(MODEL_FILE);
    let base =
        std::fs::read(&base_path).with_context(|| format!("reading {}", base_path.display()))?;
    let st = SafeTensors::deserialize(&base)
        .with_context(|| format!("{} is not valid safetensors", base_path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&base)?;
    let prefix = if st.tensor("embeddings.word_embeddings.weight").is_ok() {
        ""
    } else {
        "bert."
    };
    let mut replaced: HashMap<String, Vec<u8>> = HashMap::new();
    for &(layer, which) in &info.modules {
        let name = format!(
            "{prefix}encoder.layer.{layer}.{}.weight",
            which.checkpoint_name()
        );
        let w = &merged.layers[layer].linear(which).weight;
        replaced.insert(name, w.data.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    let mut tensors: Vec<(String, Dtype, Vec<usize>, &[u8])> = Vec::new();
    for (name, view) in st.tensors() {
        match replaced.get(&name) {
            Some(data) => tensors.push((name, Dtype::F32, view.shape().to_vec(), data)),
            None => tensors.push((name, view.dtype(), view.shape().to_vec(), view.data())),
        }
    }
    let found = tensors
        .iter()
        .filter(|(n, ..)| replaced.contains_key(n))
        .count();
    if found != replaced.len() {
        let missing: Vec<&String> = replaced
            .keys()
            .filter(|n| !tensors.iter().any(|(t, ..)| t == *n))
            .collect();
        bail!(
            "{} has no tensor {missing:?} to merge the adapter into",
            base_path.display()
        );
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.as_str(), v))
                .with_context(|| format!("tensor {name}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_else(|| HashMap::from([("format".to_owned(), "pt".to_owned())]));
    let model_bytes = safetensors::tensor::serialize(views, Some(metadata))?;

    // Everything is checked and made before the first file is written.
    let head = match info.head_classes {
        Some(classes) => read_head(&bytes, classes, config.hidden_size)
            .with_context(|| format!("adapter file {file}"))?,
        None => None,
    };
    info.labels()
        .with_context(|| format!("adapter file {file}"))?;
    let mut files: Vec<(&str, Vec<u8>)> = vec![(MODEL_FILE, model_bytes)];
    if let Some(head) = &head {
        files.push((HEAD_FILE, head_file(head, &info)?));
    }
    let card = model_card(&args, &info, head.as_ref().map(|h| h.bias.len()));
    files.push(("README.md", card.into_bytes()));
    let copied = write_dir(&out, &files, Some(&args.model))?;
    eprintln!(
        "merged {} modules of rank {} into the weights of {} (left as it was) and wrote them \
         to {} ({} tensors; copied {})",
        info.names.len(),
        info.rank,
        args.model.display(),
        args.out.join(MODEL_FILE).display(),
        tensors.len(),
        copied.join(", ")
    );
    println!(
        "{}",
        serde_json::json!({
            "out": args.out.display().to_string(),
            "modules_merged": info.names.len(),
            "rank": info.rank,
            "tensors": tensors.len(),
            "head": head.is_some().then_some(HEAD_FILE),
            "copied": copied,
        })
    );
    Ok(())
}
