//! Loading `config.json` + `model.safetensors`: round trip, `bert.` prefix and
//! old `gamma`/`beta` names, f16/bf16 conversion, and the errors for a
//! missing tensor, a wrong shape and an unsupported configuration.

use std::collections::HashMap;
use std::path::PathBuf;

use fedsb_engine::model::{BertConfig, BertWeights, ModelLoadError};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 24,
        max_position_embeddings: 32,
        ..BertConfig::default()
    }
}

/// Every tensor of `bytes` as (name, dtype, shape, data), renamed by `rename`.
fn rewrite(
    bytes: &[u8],
    rename: impl Fn(&str) -> String,
    convert: impl Fn(&str, Vec<usize>, &[u8]) -> (Dtype, Vec<usize>, Vec<u8>),
) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let (dtype, shape, data) = convert(&name, view.shape().to_vec(), view.data());
            (rename(&name), dtype, shape, data)
        })
        .collect();
    let views = owned.iter().map(|(name, dtype, shape, data)| {
        (
            name.clone(),
            TensorView::new(*dtype, shape.clone(), data).unwrap(),
        )
    });
    safetensors::tensor::serialize(views, None::<HashMap<String, String>>).unwrap()
}

fn keep(_: &str, shape: Vec<usize>, data: &[u8]) -> (Dtype, Vec<usize>, Vec<u8>) {
    (Dtype::F32, shape, data.to_vec())
}

fn config_json(config: &BertConfig) -> Vec<u8> {
    serde_json::to_vec(config).unwrap()
}

#[test]
fn round_trip_through_safetensors() {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 3, 0.2);
    let loaded = BertWeights::from_bytes(&config_json(&config), &weights.to_safetensors()).unwrap();
    assert_eq!(loaded, weights);
}

#[test]
fn accepts_bert_prefix_gamma_beta_and_extra_tensors() {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 4, 0.2);
    let renamed = rewrite(
        &weights.to_safetensors(),
        |name| {
            let name = name
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            format!("bert.{name}")
        },
        keep,
    );
    // A BertForSequenceClassification checkpoint also has a pooler and a classifier.
    let st = SafeTensors::deserialize(&renamed).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    owned.push(("classifier.weight".into(), vec![3, 16], vec![0; 3 * 16 * 4]));
    owned.push(("bert.pooler.dense.bias".into(), vec![16], vec![0; 16 * 4]));
    let views = owned.iter().map(|(n, s, d)| {
        (
            n.clone(),
            TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
        )
    });
    let bytes = safetensors::tensor::serialize(views, None).unwrap();

    let loaded = BertWeights::from_bytes(&config_json(&config), &bytes).unwrap();
    assert_eq!(loaded, weights);
}

#[test]
fn converts_f16_and_bf16_to_f32() {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 5, 0.2);
    for dtype in [Dtype::F16, Dtype::BF16] {
        let bytes = rewrite(
            &weights.to_safetensors(),
            str::to_owned,
            |_, shape, data| {
                let halves = data
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        match dtype {
                            Dtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                            _ => half::bf16::from_f32(x).to_le_bytes(),
                        }
                    })
                    .collect();
                (dtype, shape, halves)
            },
        );
        let loaded = BertWeights::from_bytes(&config_json(&config), &bytes).unwrap();
        let tolerance = if dtype == Dtype::F16 { 1e-3 } else { 8e-3 };
        let (a, b) = (
            &loaded.layers[1].intermediate.weight.data,
            &weights.layers[1].intermediate.weight.data,
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= tolerance * y.abs().max(1e-2),
                "{dtype:?}: {x} vs {y}"
            );
        }
        assert_ne!(loaded, weights, "{dtype:?} rounding should be visible");
    }
}

#[test]
fn wrong_shape_is_an_error_naming_tensor_and_shapes() {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 6, 0.2);
    let bytes = rewrite(
        &weights.to_safetensors(),
        str::to_owned,
        |name, shape, data| {
            if name == "encoder.layer.1.attention.self.key.weight" {
                (Dtype::F32, vec![16, 15], data[..16 * 15 * 4].to_vec())
            } else {
                (Dtype::F32, shape, data.to_vec())
            }
        },
    );
    // Through files, as `fedsb` loads a model directory.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model_loading_wrong_shape");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json(&config)).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();

    let err = BertWeights::from_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, ModelLoadError::ShapeMismatch { name, expected, found }
            if name == "encoder.layer.1.attention.self.key.weight" && expected == &[16, 16] && found == &[16, 15]),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "tensor `encoder.layer.1.attention.self.key.weight` has shape [16, 15], expected [16, 16]"
    );
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 7, 0.2);
    let st_bytes = weights.to_safetensors();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let views = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "encoder.layer.0.output.LayerNorm.bias");
    let bytes = safetensors::tensor::serialize(views, None).unwrap();
    let err = BertWeights::from_bytes(&config_json(&config), &bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `encoder.layer.0.output.LayerNorm.bias` is missing from model.safetensors (expected shape [16])"
    );
    // More layers in config.json than in the file.
    let deeper = BertConfig {
        num_hidden_layers: 3,
        ..config.clone()
    };
    let err = BertWeights::from_bytes(&config_json(&deeper), &st_bytes).unwrap_err();
    assert!(
        err.to_string()
            .contains("encoder.layer.2.attention.self.query.weight"),
        "{err}"
    );
    // Garbage is a parse error, not a panic.
    let err = BertWeights::from_bytes(&config_json(&config), b"not safetensors").unwrap_err();
    assert!(matches!(err, ModelLoadError::Safetensors(_)), "{err:?}");
}

#[test]
fn config_defaults_and_validation() {
    // all-MiniLM-L6-v2's config.json.
    let minilm = br#"{"_name_or_path": "nreimers/MiniLM-L6-H384-uncased", "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": false, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 384, "initializer_range": 0.02, "intermediate_size": 1536,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute",
        "transformers_version": "4.8.2", "type_vocab_size": 2, "use_cache": true, "vocab_size": 30522}"#;
    let c = BertConfig::from_json(minilm).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size
        ),
        (384, 6, 12, 1536)
    );
    assert_eq!(c.head_dim(), 32);

    // Missing keys take transformers.BertConfig's defaults (bert-base).
    let c = BertConfig::from_json(br#"{"hidden_size": 768}"#).unwrap();
    assert_eq!(c, BertConfig::default());
    assert_eq!(
        (c.vocab_size, c.layer_norm_eps, c.max_position_embeddings),
        (30522, 1e-12, 512)
    );

    let err = BertConfig::from_json(br#"{"hidden_act": "relu"}"#).unwrap_err();
    assert!(
        err.to_string()
            .contains("hidden_act \"relu\" is not supported"),
        "{err}"
    );
    let err =
        BertConfig::from_json(br#"{"hidden_size": 100, "num_attention_heads": 12}"#).unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
    let err = BertConfig::from_json(b"{").unwrap_err();
    assert!(matches!(err, ModelLoadError::Config(_)), "{err:?}");
}
