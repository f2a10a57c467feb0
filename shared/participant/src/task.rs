//! A task's files and a participant's data, checked against the task.

use fedsb_engine::data::{read_dataset, ColumnSpec, DataFormat, Dataset};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::LoraSbAdapters;
use fedsb_protocol::TaskInfo;

use crate::adapter_file::{parse_module_names, read_adapter_file, ModuleRef};
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
    let data = read_dataset(bytes, format, &spec, file_name).map_err(|e| {
        invalid(format!(
            "{e} (labels must be the task's classes {:?}: names, or class ids 0..{})",
            labels,
            labels.len()
        ))
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
