//! GPT-OSS model configuration, read from a Hugging Face `config.json`.

use std::path::Path;

use serde_json::Value;

use crate::error::{io_err, Error, Result};

/// Which attention a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Full,
}

/// RoPE scaling. gpt-oss uses YaRN; `Default` is plain RoPE.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Yarn {
        factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_max_position_embeddings: f64,
        truncate: bool,
        attention_factor: Option<f64>,
    },
}

/// The model hyper-parameters. `Default` is gpt-oss-20b.
#[derive(Clone, Debug, PartialEq)]
pub struct GptOssConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub swiglu_limit: f64,
    pub swiglu_alpha: f64,
    pub max_position_embeddings: usize,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
    /// `quantization_config.quant_method == "mxfp4"`: experts stored as `*_blocks` / `*_scales`.
    pub mxfp4_experts: bool,
}

impl Default for GptOssConfig {
    fn default() -> Self {
        Self::gpt_oss_20b()
    }
}

fn alternating(n: usize) -> Vec<LayerType> {
    (0..n).map(|i| if i % 2 == 0 { LayerType::Sliding } else { LayerType::Full }).collect()
}

impl GptOssConfig {
    /// openai/gpt-oss-20b (hub `config.json`).
    pub fn gpt_oss_20b() -> Self {
        Self {
            vocab_size: 201088,
            hidden_size: 2880,
            intermediate_size: 2880,
            num_hidden_layers: 24,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            head_dim: 64,
            num_local_experts: 32,
            num_experts_per_tok: 4,
            sliding_window: 128,
            layer_types: alternating(24),
            rms_norm_eps: 1e-5,
            rope_theta: 150000.0,
            rope_scaling: RopeScaling::Yarn {
                factor: 32.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                original_max_position_embeddings: 4096.0,
                truncate: false,
                attention_factor: None,
            },
            swiglu_limit: 7.0,
            swiglu_alpha: 1.702,
            max_position_embeddings: 131072,
            eos_token_ids: vec![200002, 199999, 200012],
            pad_token_id: Some(199999),
            tie_word_embeddings: false,
            mxfp4_experts: true,
        }
    }

    /// openai/gpt-oss-120b: 36 layers, 128 experts, otherwise as 20b.
    pub fn gpt_oss_120b() -> Self {
        Self { num_hidden_layers: 36, num_local_experts: 128, layer_types: alternating(36), ..Self::gpt_oss_20b() }
    }

    /// A tiny config of the same architecture for tests: 2 layers (sliding, full), 4 experts top-2.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            num_local_experts: 4,
            num_experts_per_tok: 2,
            sliding_window: 4,
            layer_types: alternating(2),
            max_position_embeddings: 4096,
            rope_scaling: RopeScaling::Yarn {
                factor: 32.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                original_max_position_embeddings: 128.0,
                truncate: false,
                attention_factor: None,
            },
            ..Self::gpt_oss_20b()
        }
    }

    /// The same config with other end-of-sequence ids.
    pub fn with_eos(mut self, ids: &[u32]) -> Self {
        self.eos_token_ids = ids.to_vec();
        self
    }

    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses a `config.json` (transformers 4.x `rope_scaling` + `rope_theta`, or 5.x `rope_parameters`).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|source| Error::Json { path: path.into(), source })?;
        let err = |msg: String| Error::Config { path: path.into(), msg };
        let usize_key = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("missing or non-integer `{key}` (expected a positive integer)")))
        };
        let f64_or = |key: &str, default: f64| v.get(key).and_then(Value::as_f64).unwrap_or(default);
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if mt != "gpt_oss" {
                return Err(err(format!("model_type is `{mt}`, expected `gpt_oss`")));
            }
        }
        let hidden_size = usize_key("hidden_size")?;
        let num_attention_heads = usize_key("num_attention_heads")?;
        let num_hidden_layers = usize_key("num_hidden_layers")?;
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let num_experts_per_tok = match v.get("num_experts_per_tok").or_else(|| v.get("experts_per_token")) {
            Some(x) => x.as_u64().ok_or_else(|| err("`num_experts_per_tok` must be an integer".into()))? as usize,
            None => return Err(err("missing `num_experts_per_tok`".into())),
        };
        let layer_types = match v.get("layer_types") {
            None | Some(Value::Null) => alternating(num_hidden_layers),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    Some("full_attention") => Ok(LayerType::Full),
                    other => Err(err(format!(
                        "layer_types[{i}] is {other:?}, expected \"sliding_attention\" or \"full_attention\""
                    ))),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(err("`layer_types` must be a list".into())),
        };
        // Rope: 5.x nests everything in `rope_parameters`; 4.x has `rope_scaling` + `rope_theta`.
        let rope = v
            .get("rope_parameters")
            .filter(|r| r.is_object())
            .or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
            .ok_or_else(|| err("missing `rope_theta` (top level or inside `rope_parameters`)".into()))?;
        let max_position_embeddings = usize_key("max_position_embeddings")?;
        let rope_scaling = match rope {
            None => RopeScaling::Default,
            Some(r) => {
                let ty = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
                match ty {
                    "default" => RopeScaling::Default,
                    "yarn" => {
                        let g = |k: &str| r.get(k).and_then(Value::as_f64);
                        let original = g("original_max_position_embeddings").unwrap_or(max_position_embeddings as f64);
                        RopeScaling::Yarn {
                            factor: g("factor").unwrap_or(max_position_embeddings as f64 / original),
                            beta_fast: g("beta_fast").filter(|x| *x != 0.0).unwrap_or(32.0),
                            beta_slow: g("beta_slow").filter(|x| *x != 0.0).unwrap_or(1.0),
                            original_max_position_embeddings: original,
                            // transformers defaults `truncate` to true when the key is absent.
                            truncate: r.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                            attention_factor: g("attention_factor"),
                        }
                    }
                    other => return Err(err(format!("rope type `{other}` is not supported (gpt-oss uses `yarn`)"))),
                }
            }
        };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => vec![],
        };
        let mxfp4_experts = v
            .get("quantization_config")
            .and_then(|q| q.get("quant_method"))
            .and_then(Value::as_str)
            .map(|m| m == "mxfp4")
            .unwrap_or(false);
        let cfg = Self {
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: usize_key("num_key_value_heads")?,
            head_dim,
            num_local_experts: usize_key("num_local_experts")?,
            num_experts_per_tok,
            sliding_window: v.get("sliding_window").and_then(Value::as_u64).unwrap_or(128) as usize,
            layer_types,
            rms_norm_eps: f64_or("rms_norm_eps", 1e-5),
            rope_theta,
            rope_scaling,
            swiglu_limit: f64_or("swiglu_limit", 7.0),
            swiglu_alpha: f64_or("swiglu_alpha", 1.702),
            max_position_embeddings,
            eos_token_ids,
            pad_token_id: v.get("pad_token_id").and_then(Value::as_u64).map(|x| x as u32),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            mxfp4_experts,
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Checks the relations between fields; the message says what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("sliding_window", self.sliding_window),
        ];
        for (k, x) in nonzero {
            if x == 0 {
                return Err(format!("`{k}` must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(format!(
                "num_experts_per_tok ({}) exceeds num_local_experts ({})",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(format!(
                "layer_types has {} entries but num_hidden_layers is {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.mxfp4_experts && (!self.hidden_size.is_multiple_of(32) || !self.intermediate_size.is_multiple_of(32)) {
            return Err("MXFP4 experts need hidden_size and intermediate_size divisible by 32".into());
        }
        Ok(())
    }

    /// Writes a transformers-5-style `config.json` value.
    pub fn to_json(&self) -> Value {
        let rope = match &self.rope_scaling {
            RopeScaling::Default => serde_json::json!({"rope_type": "default", "rope_theta": self.rope_theta}),
            RopeScaling::Yarn {
                factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings,
                truncate,
                attention_factor,
            } => {
                let mut r = serde_json::json!({
                    "rope_type": "yarn", "rope_theta": self.rope_theta, "factor": factor, "beta_fast": beta_fast,
                    "beta_slow": beta_slow, "original_max_position_embeddings": original_max_position_embeddings,
                    "truncate": truncate,
                });
                if let Some(a) = attention_factor {
                    r["attention_factor"] = serde_json::json!(a);
                }
                r
            }
        };
        let mut v = serde_json::json!({
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types.iter().map(|t| match t { LayerType::Sliding => "sliding_attention", LayerType::Full => "full_attention" }).collect::<Vec<_>>(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "swiglu_limit": self.swiglu_limit,
            "max_position_embeddings": self.max_position_embeddings,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": true,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "output_router_logits": false,
            "router_aux_loss_coef": 0.9,
            "use_cache": true,
        });
        if self.mxfp4_experts {
            v["quantization_config"] = serde_json::json!({
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
            });
        }
        v
    }
}
