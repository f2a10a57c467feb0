//! A task's files and a participant's data, checked against the task.

use fedsb_engine::data::{read_dataset, ColumnSpec, DataError, DataFormat, Dataset};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::LoraSbAdapters;
use fedsb_protocol::TaskInfo;

use crate::adapter_file::{
    adapter_file_metadata, check_base_model, parse_module_names, read_adapter_file, ModuleRef,
};
use crate::ParticipantError;

fn invalid(message: impl Into<String>) -> ParticipantError {
    ParticipantError::Invalid(message.into())
}

/// Everything a participant trains with, loaded from the task's files.
#[derive(Debug)]
pub struct TaskModel {
    pub weights: BertWeights<f32>,
    pub tokenizer: BertTokenizer,
    /// The frozen A and B (and the file's R₀) of every adapted module.
    pub frozen: LoraSbAdapters<f32>,
    /// The adapted modules, in the task's `module_names` order.
    pub modules: Vec<ModuleRef>,
}

impl TaskModel {
    /// Parses the task's `config.json`, `model.safetensors`, `tokenizer.json`
    /// and adapter file, checking them against the shapes `task` announces.
    pub fn load(
        task: &TaskInfo,
        config_json: &[u8],
        model_safetensors: &[u8],
        tokenizer_json: &[u8],
        adapter_safetensors: &[u8],
    ) -> Result<Self, ParticipantError> {
        let weights = BertWeights::from_bytes(config_json, model_safetensors)?;
        let tokenizer = BertTokenizer::from_bytes(tokenizer_json)?
            .with_max_length(task.max_seq_len as usize)?;
        let config = &weights.config;
        let shape = &task.shape;
        if shape.head_hidden as usize != config.hidden_size {
            return Err(invalid(format!(
                "the task's head expects hidden size {}, the model has {}",
                shape.head_hidden, config.hidden_size
            )));
        }
        if shape.modules as usize != task.module_names.len() {
            return Err(invalid(format!(
                "the task announces {} modules but names {}",
                shape.modules,
                task.module_names.len()
            )));
        }
        if shape.head_classes as usize != task.labels.len() {
            return Err(invalid(format!(
                "the task's head has {} classes but {} labels",
                shape.head_classes,
                task.labels.len()
            )));
        }
        // The aggregator checked its adapter file against its model at
        // start; a participant checks the pair it downloaded too, so that a
        // file made for another checkpoint of the same shapes is never
        // trained on. A task without a model file (`model_sha256` empty)
        // announces nothing to check against.
        if !task.model_sha256.is_empty() {
            check_base_model(
                &adapter_file_metadata(adapter_safetensors)?,
                "the task's adapter file",
                "the task's model.safetensors",
                &task.model_sha256,
            )?;
        }
        let modules = parse_module_names(&task.module_names, config.num_hidden_layers)?;
        let frozen = read_adapter_file(
            adapter_safetensors,
            &task.module_names,
            &modules,
            config,
            shape.rank as usize,
        )?;
        Ok(Self {
            weights,
            tokenizer,
            frozen,
            modules,
        })
    }
}

/// Reads a participant's labelled data (CSV, TSV or JSON Lines, by
/// `file_name`'s extension) from memory with the task's class names
/// (`labels`, in head order): labels
/// may be those names or class ids below their count; rows without a label
/// are skipped. Columns not named are detected from the header.
pub fn read_task_data(
    bytes: &[u8],
    file_name: &str,
    columns: ColumnSpec,
    labels: &[String],
) -> Result<Dataset, ParticipantError> {
    let format = DataFormat::from_file_name(file_name).ok_or_else(|| {
        invalid(format!(
            "{file_name}: cannot tell the format from the name (expected .csv, .tsv or .jsonl)"
        ))
    })?;
    let spec = ColumnSpec {
        label_names: Some(labels.to_vec()),
        skip_rows_without_label: true,
        ..columns
    };
    let data = read_dataset(bytes, format, &spec, file_name).map_err(|e| match e {
        // What a label must be, where one was wrong.
        DataError::Label { .. } => invalid(format!(
            "{e} (labels must be the task's classes {:?}: names, or class ids 0 to {})",
            labels,
            labels.len().saturating_sub(1)
        )),
        e => invalid(e.to_string()),
    })?;
    if data.label_column.is_none() {
        return Err(invalid(format!(
            "{file_name}: no label column found (name it)"
        )));
    }
    if data.label_names != labels {
        return Err(invalid(format!(
            "{file_name}: classes {:?} do not match the task's {:?}",
            data.label_names, labels
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fedsb_engine::model::{wordpiece_tokenizer_json, BertConfig};
    use fedsb_engine::reference::{ClassifierHead, Matrix};
    use fedsb_protocol::AdapterShape;

    use super::*;
    use crate::adapter_file::{adapter_file_bytes, layered_modules, BASE_MODEL_SHA256};

    #[test]
    fn an_adapter_file_for_another_base_model_is_not_trained_on() {
        let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad"];
        let config = BertConfig {
            vocab_size: vocab.len(),
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            ..BertConfig::default()
        };
        let config_json = serde_json::to_vec(&config).unwrap();
        let model = BertWeights::random(&config, 1, 0.3).to_safetensors();
        let tokenizer = wordpiece_tokenizer_json(&vocab, true).unwrap();
        let rank = 2;
        let (names, modules) = layered_modules(&["attention.self.query".into()], 1).unwrap();
        let adapters = LoraSbAdapters::<f32>::random(&config, rank, 2, 0.1);
        let head = ClassifierHead {
            weight: Matrix::zeros(2, config.hidden_size),
            bias: vec![0.0; 2],
        };
        let ours = "ab".repeat(32);
        let task = |model_sha256: &str| TaskInfo {
            task_id: "t".into(),
            model_id: "m".into(),
            model_sha256: model_sha256.into(),
            module_names: names.clone(),
            shape: AdapterShape {
                rank: rank as u32,
                modules: names.len() as u32,
                head_classes: 2,
                head_hidden: config.hidden_size as u32,
            },
            labels: vec!["neg".into(), "pos".into()],
            local_steps: 1,
            batch_size: 1,
            learning_rate: 1e-3,
            head_learning_rate: 1e-3,
            max_seq_len: 8,
            total_rounds: 1,
            files: Vec::new(),
            privacy: None,
        };
        let adapter_for = |base: Option<&str>| {
            let metadata: HashMap<String, String> = base
                .map(|b| (BASE_MODEL_SHA256.to_owned(), b.to_owned()))
                .into_iter()
                .collect();
            adapter_file_bytes(&names, &modules, &adapters, &head, metadata).unwrap()
        };
        let load = |task: &TaskInfo, adapter: &[u8]| {
            TaskModel::load(task, &config_json, &model, &tokenizer, adapter)
        };

        // Made for the task's model, or recording none: loaded.
        let loaded = load(&task(&ours), &adapter_for(Some(&ours))).unwrap();
        assert_eq!(loaded.modules, modules);
        load(&task(&ours), &adapter_for(None)).unwrap();
        // A task that announces no model hash has nothing to check against.
        load(&task(""), &adapter_for(Some(&ours))).unwrap();
        // Made for another checkpoint of the same shapes: refused.
        let theirs = "cd".repeat(32);
        let e = load(&task(&ours), &adapter_for(Some(&theirs)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the task's adapter file was made for a base model")
                && e.contains(&theirs[..12])
                && e.contains(&ours[..12]),
            "{e}"
        );
    }
}
