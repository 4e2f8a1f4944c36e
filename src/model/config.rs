//! Phi-3's `config.json`, typed. Keys we don't use are ignored (Hugging Face configs carry many);
//! the ones we use are checked, and a config that is not Phi-3 is rejected with a clear error.
//! Both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the transformers 5 layout
//! (`rope_parameters`) are read. The "llamafied" re-uploads of Phi checkpoints (model_type `llama`
//! or `mistral`, split q/k/v and gate/up: [`Layout::Split`]) are the same model and read too.

use super::names::{self, Layout};
use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

/// The `model_type` of the Phi-3 family (Phi-3, Phi-3.5-mini, Phi-4 and Phi-4-mini all use it).
pub const MODEL_TYPE: &str = "phi3";
/// The model types of the split-layout re-uploads: transformers' Llama (no sliding window) and
/// Mistral (a sliding window, as Phi-3's).
pub const SPLIT_MODEL_TYPES: [&str; 2] = ["llama", "mistral"];

/// Token ids from a JSON value that is one id or a list of ids (`eos_token_id` in config.json and
/// generation_config.json); anything else gives none.
pub fn token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub head_dim: usize,
    /// The leading dims of each head that are rotated, `int(head_dim · partial_rotary_factor)`
    /// (transformers' definition; Phi-4-mini rotates 96 of 128); the rest pass through unchanged.
    /// Frequencies are `θ^(−2i / rotary_dim)`.
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
}

/// Long-context scaling of the rotary frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Phi-3 128k "longrope" (formerly "su"): `inv_freq_i = 1 / (factor_i · θ^(2i/d))` with the long
    /// factors once a sequence exceeds `original_max`, cos/sin scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max: usize,
        attention_factor: f64,
    },
}

/// Hyper-parameters of a Phi-3 checkpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Phi3Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Fraction of each head that is rotated (Phi-4-mini: 0.75); also read from `rope_parameters`.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// One id or a list (generation stops at any of them).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Llama/Mistral keys that must keep Phi-3's values: no biases, SiLU, `head_dim` equal to
    /// `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub head_dim: Option<usize>,
}

/// Upper bound on config.json's sizes (vocab, hidden, intermediate, positions): far above any Phi
/// checkpoint (vocab 200,064, hidden 5,120, 128k positions), and low enough that every shape
/// product fits in a `usize`, so a damaged config cannot overflow them.
pub const MAX_SIZE: usize = 1 << 24;
/// Upper bound on `num_hidden_layers` (Phi-3-medium has 40): the loader reserves one slot per
/// layer before it reads the weights.
pub const MAX_LAYERS: usize = 1024;

fn default_rms_norm_eps() -> f64 {
    1e-5
}

impl Phi3Config {
    /// Reads and checks a config.json value; `origin` names the file in errors.
    pub fn from_value(value: &serde_json::Value, origin: &str) -> Result<Self> {
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some(MODEL_TYPE) => {}
            Some(t) if SPLIT_MODEL_TYPES.contains(&t) => {}
            Some(other) => bail!(
                "{origin}: model_type is `{other}`, not `{MODEL_TYPE}`; qlora supports Phi-3 checkpoints \
                 (e.g. microsoft/Phi-3-mini-4k-instruct) and their llamafied re-uploads (`llama`, `mistral`)"
            ),
            None => bail!("{origin}: no model_type key; is this a Hugging Face config.json?"),
        }
        let mut cfg: Self = serde_json::from_value(value.clone())
            .with_context(|| format!("{origin}: not a valid Phi-3 config"))?;
        // transformers' Llama has no sliding window (its config may still carry Phi-3's key).
        if cfg.model_type == "llama" {
            cfg.sliding_window = None;
        }
        cfg.validate()
            .with_context(|| format!("{origin}: inconsistent Phi-3 config"))?;
        Ok(cfg)
    }

    /// Where the block's input projections are fused (`phi3`) or split (`llama`, `mistral`).
    pub fn layout(&self) -> Layout {
        if self.model_type == MODEL_TYPE {
            Layout::Fused
        } else {
            Layout::Split
        }
    }

    fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            ensure!(v <= MAX_SIZE, "{key} {v} is larger than {MAX_SIZE}");
        }
        ensure!(
            self.num_hidden_layers <= MAX_LAYERS,
            "num_hidden_layers {} is more than {MAX_LAYERS}",
            self.num_hidden_layers
        );
        ensure!(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0,
            "rms_norm_eps {} is not a finite number ≥ 0",
            self.rms_norm_eps
        );
        ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        let kv = self.num_kv_heads();
        ensure!(
            kv > 0 && self.num_attention_heads.is_multiple_of(kv),
            "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
            self.num_attention_heads
        );
        ensure!(
            self.num_hidden_layers > 0 && self.vocab_size > 0 && self.intermediate_size > 0,
            "num_hidden_layers, vocab_size and intermediate_size must be positive"
        );
        ensure!(
            self.attention_bias != Some(true) && self.mlp_bias != Some(true),
            "attention_bias / mlp_bias: linear layers with biases are not Phi-3's"
        );
        if let Some(act) = &self.hidden_act {
            ensure!(
                act == "silu",
                "hidden_act `{act}`: Phi-3's MLP is SiLU-gated"
            );
        }
        if let Some(d) = self.head_dim {
            ensure!(
                d == self.head_dim(),
                "head_dim {d} is not hidden_size / num_attention_heads = {}",
                self.head_dim()
            );
        }
        self.rope()?;
        Ok(())
    }

    /// Key/value heads (grouped-query attention); defaults to the attention heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// `[out, in]` of each block linear of this checkpoint's layout, by PEFT target name.
    pub fn linear_shape(&self, target: &str) -> Option<[usize; 2]> {
        self.layout().suffix(target)?;
        self.any_linear_shape(target)
    }

    /// `[out, in]` of a block linear of either layout (`q_proj` of a fused checkpoint: the rows of
    /// its `qkv_proj` that `q_proj` would be).
    pub fn any_linear_shape(&self, target: &str) -> Option<[usize; 2]> {
        let (h, hd, i) = (self.hidden_size, self.head_dim(), self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * hd, self.num_kv_heads() * hd);
        match target {
            "qkv_proj" => Some([q + 2 * kv, h]),
            "q_proj" => Some([q, h]),
            "k_proj" | "v_proj" => Some([kv, h]),
            "o_proj" => Some([h, q]),
            "gate_up_proj" => Some([2 * i, h]),
            "gate_proj" | "up_proj" => Some([i, h]),
            "down_proj" => Some([h, i]),
            _ => None,
        }
    }

    /// The rows `(start, len)` of split target `target` inside its fused weight
    /// ([`names::fused_of`]): `k_proj` starts after Q's rows, `up_proj` after gate's.
    pub fn rows_in_fused(&self, target: &str) -> Option<(usize, usize)> {
        let fused = names::fused_of(target)?;
        let mut start = 0;
        for part in names::split_parts(fused) {
            let [rows, _] = self.any_linear_shape(part)?;
            if *part == target {
                return Some((start, rows));
            }
            start += rows;
        }
        None
    }

    /// A warning when `max_seq_len` exceeds the context the checkpoint was built for
    /// (`max_position_embeddings`), saying what rope scaling it has.
    pub fn context_warning(&self, max_seq_len: usize) -> Option<String> {
        let context = self.max_position_embeddings;
        if max_seq_len <= context {
            return None;
        }
        let scaling = match self.rope() {
            Ok(RopeConfig {
                scaling: RopeScaling::None,
                theta,
                ..
            }) => format!("no rope scaling (rope_theta {theta})"),
            Ok(RopeConfig {
                scaling: RopeScaling::LongRope { original_max, .. },
                ..
            }) => format!(
                "longrope scaling from its original {original_max} tokens to {context}, and none \
                 beyond"
            ),
            Err(e) => format!("a rope configuration qlora cannot read ({e})"),
        };
        Some(format!(
            "training.max_seq_len {max_seq_len} exceeds the model's context length {context} \
             (max_position_embeddings in config.json); the checkpoint has {scaling}, so positions \
             past {context} were never trained and rotary angles are extrapolated there. Set \
             max_seq_len to {context} or less unless you mean to extend the context"
        ))
    }

    /// The rotary embedding: base, rotated fraction and scaling, from `rope_parameters`
    /// (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4 and Microsoft's configs).
    pub fn rope(&self) -> Result<RopeConfig> {
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .filter(|v| !v.is_null());
        let get_f64 = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
        let theta = self
            .rope_theta
            .or_else(|| get_f64("rope_theta"))
            .unwrap_or(10000.0);
        ensure!(
            theta.is_finite() && theta > 0.0,
            "rope_theta {theta} is not a positive number"
        );
        let partial = self
            .partial_rotary_factor
            .or_else(|| get_f64("partial_rotary_factor"))
            .unwrap_or(1.0);
        ensure!(
            partial > 0.0 && partial <= 1.0,
            "partial_rotary_factor {partial} is not in (0, 1]"
        );
        // transformers: dim = int(head_dim * partial_rotary_factor).
        let rotary_dim = (self.head_dim() as f64 * partial) as usize;
        ensure!(
            rotary_dim >= 2 && rotary_dim.is_multiple_of(2),
            "partial_rotary_factor {partial} of head_dim {} rotates {rotary_dim} dims; rotate-half \
             RoPE needs an even, nonzero number",
            self.head_dim()
        );
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "longrope" | "su" => {
                let factors = |k: &str| -> Result<Vec<f64>> {
                    let list = params
                        .and_then(|p| p.get(k))
                        .and_then(|v| v.as_array())
                        .with_context(|| format!("longrope needs `{k}`"))?;
                    let f: Vec<f64> = list.iter().filter_map(|v| v.as_f64()).collect();
                    ensure!(
                        f.len() == rotary_dim / 2 && f.len() == list.len(),
                        "`{k}` has {} numbers, want rotary dims / 2 = {}",
                        list.len(),
                        rotary_dim / 2
                    );
                    ensure!(
                        f.iter().all(|x| x.is_finite() && *x > 0.0),
                        "`{k}` holds a factor that is not a positive number"
                    );
                    Ok(f)
                };
                let original_max = params
                    .and_then(|p| p.get("original_max_position_embeddings"))
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize)
                    .or(self.original_max_position_embeddings)
                    .unwrap_or(self.max_position_embeddings);
                ensure!(
                    original_max > 0,
                    "longrope needs original_max_position_embeddings > 0"
                );
                // transformers' _compute_longrope_parameters: an explicit attention_factor, else
                // sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original.
                let scale = self.max_position_embeddings as f64 / original_max as f64;
                let attention_factor = get_f64("attention_factor").unwrap_or(if scale <= 1.0 {
                    1.0
                } else {
                    (1.0 + scale.ln() / (original_max as f64).ln()).sqrt()
                });
                ensure!(
                    attention_factor.is_finite() && attention_factor > 0.0,
                    "longrope attention_factor {attention_factor} is not a positive number"
                );
                RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    original_max,
                    attention_factor,
                }
            }
            other => bail!("rope scaling `{other}` is not supported (Phi-3 uses none or longrope)"),
        };
        Ok(RopeConfig {
            theta,
            head_dim: self.head_dim(),
            rotary_dim,
            scaling,
        })
    }

    /// The end-of-sequence ids (`eos_token_id` may be one id or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        token_ids(self.eos_token_id.as_ref())
    }

    /// Whether config.json already declares a quantization.
    pub fn is_quantized(&self) -> bool {
        self.quantization_config.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini() -> serde_json::Value {
        // microsoft/Phi-3-mini-4k-instruct's config.json, the keys that matter.
        serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
            "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "rope_scaling": null, "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096, "sliding_window": 2047,
            "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000
        })
    }

    #[test]
    fn phi3_mini_shapes() {
        let c = Phi3Config::from_value(&mini(), "config.json").unwrap();
        assert_eq!(c.head_dim(), 96);
        assert_eq!(c.linear_shape("qkv_proj"), Some([9216, 3072]));
        assert_eq!(c.linear_shape("gate_up_proj"), Some([16384, 3072]));
        assert_eq!(c.linear_shape("down_proj"), Some([3072, 8192]));
        assert_eq!(c.eos_token_ids(), vec![32000]);
        let mut v = mini();
        v["eos_token_id"] = serde_json::json!([32000, 32001, 32007]);
        assert_eq!(
            Phi3Config::from_value(&v, "c").unwrap().eos_token_ids(),
            vec![32000, 32001, 32007]
        );
    }

    #[test]
    fn llamafied_configs_are_the_split_layout() {
        // unsloth/Phi-3-mini-4k-instruct-bnb-4bit's keys beyond Phi-3's.
        let mut v = mini();
        for (k, x) in [
            ("model_type", serde_json::json!("llama")),
            ("attention_bias", false.into()),
            ("mlp_bias", false.into()),
            ("hidden_act", "silu".into()),
            ("pretraining_tp", 1.into()),
        ] {
            v[k] = x;
        }
        let c = Phi3Config::from_value(&v, "c").unwrap();
        assert_eq!(c.layout(), Layout::Split);
        assert_eq!(c.sliding_window, None, "Llama has no sliding window");
        assert_eq!(c.linear_shape("qkv_proj"), None);
        assert_eq!(c.linear_shape("k_proj"), Some([3072, 3072]));
        assert_eq!(c.linear_shape("up_proj"), Some([8192, 3072]));
        assert_eq!(c.rows_in_fused("v_proj"), Some((6144, 3072)));
        assert_eq!(c.rows_in_fused("up_proj"), Some((8192, 8192)));
        assert_eq!(c.rows_in_fused("o_proj"), Some((0, 3072)));
        v["model_type"] = "mistral".into();
        let c = Phi3Config::from_value(&v, "c").unwrap();
        assert_eq!(c.sliding_window, Some(2047), "Mistral keeps its window");
        for (k, x, msg) in [
            ("attention_bias", serde_json::json!(true), "biases"),
            ("hidden_act", "gelu".into(), "gelu"),
            ("head_dim", 128.into(), "head_dim 128"),
        ] {
            let mut w = v.clone();
            w[k] = x;
            let e = format!(
                "{:#}",
                Phi3Config::from_value(&w, "x/config.json").unwrap_err()
            );
            assert!(e.contains("x/config.json") && e.contains(msg), "{e}");
        }
        // Phi-3-medium: 40 heads of 128, 10 kv heads.
        let mut m = mini();
        m["hidden_size"] = 5120.into();
        m["num_attention_heads"] = 40.into();
        m["num_key_value_heads"] = 10.into();
        let c = Phi3Config::from_value(&m, "c").unwrap();
        assert_eq!(c.linear_shape("qkv_proj"), Some([5120 + 2 * 1280, 5120]));
        assert_eq!(c.rows_in_fused("k_proj"), Some((5120, 1280)));
    }

    #[test]
    fn other_architectures_are_rejected_by_name() {
        let mut v = mini();
        v["model_type"] = "gemma".into();
        let err = Phi3Config::from_value(&v, "x/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x/config.json") && err.contains("`gemma`"),
            "{err}"
        );
        v.as_object_mut().unwrap().remove("model_type");
        assert!(
            Phi3Config::from_value(&v, "c")
                .unwrap_err()
                .to_string()
                .contains("no model_type")
        );
        let mut v = mini();
        v["num_key_value_heads"] = 5.into();
        let err = format!("{:#}", Phi3Config::from_value(&v, "c").unwrap_err());
        assert!(err.contains("num_key_value_heads 5"), "{err}");
    }

    #[test]
    fn a_max_seq_len_past_the_context_is_warned_with_the_rope_scaling() {
        let c = Phi3Config::from_value(&mini(), "config.json").unwrap();
        assert_eq!(c.context_warning(4096), None);
        let w = c.context_warning(4097).unwrap();
        assert!(
            w.contains("4097 exceeds the model's context length 4096") && w.contains("no rope"),
            "{w}"
        );
        // Phi-3-mini-128k: longrope from 4096 to 131072.
        let mut v = mini();
        v["max_position_embeddings"] = 131072.into();
        v["original_max_position_embeddings"] = 4096.into();
        v["rope_scaling"] = serde_json::json!({"type": "longrope", "short_factor": vec![1.0; 48],
                                               "long_factor": vec![1.0; 48]});
        let c = Phi3Config::from_value(&v, "config.json").unwrap();
        assert_eq!(c.context_warning(8192), None);
        let w = c.context_warning(200_000).unwrap();
        assert!(
            w.contains("longrope scaling from its original 4096 tokens to 131072"),
            "{w}"
        );
    }

    #[test]
    fn phi4_mini_rotates_three_quarters_of_each_head() {
        // microsoft/Phi-4-mini-instruct's config.json, the rope keys (factors shortened to ones).
        let mut v = mini();
        for (k, x) in [
            ("vocab_size", serde_json::json!(200064)),
            ("num_attention_heads", 24.into()),
            ("num_key_value_heads", 8.into()),
            ("partial_rotary_factor", 0.75.into()),
            ("max_position_embeddings", 131072.into()),
            ("tie_word_embeddings", true.into()),
            (
                "rope_scaling",
                serde_json::json!({"type": "longrope", "short_factor": vec![1.0; 48],
                                   "long_factor": vec![1.0; 48]}),
            ),
        ] {
            v[k] = x;
        }
        let c = Phi3Config::from_value(&v, "config.json").unwrap();
        let rope = c.rope().unwrap();
        assert_eq!((rope.head_dim, rope.rotary_dim), (128, 96));
        // transformers 5 keeps it in rope_parameters.
        let mut v5 = mini();
        v5["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5});
        let rope = Phi3Config::from_value(&v5, "c").unwrap().rope().unwrap();
        assert_eq!(rope.rotary_dim, 48);
        // Factors sized for the whole head, an odd rotary dim, a factor out of range: refused.
        v["rope_scaling"]["short_factor"] = serde_json::json!(vec![1.0; 64]);
        let e = format!(
            "{:#}",
            Phi3Config::from_value(&v, "x/config.json").unwrap_err()
        );
        assert!(
            e.contains("x/config.json") && e.contains("short_factor"),
            "{e}"
        );
        let mut v = mini();
        v["partial_rotary_factor"] = 0.15625.into();
        let e = format!("{:#}", Phi3Config::from_value(&v, "c").unwrap_err());
        assert!(e.contains("rotates 15 dims"), "{e}");
        v["partial_rotary_factor"] = 1.5.into();
        let e = format!("{:#}", Phi3Config::from_value(&v, "c").unwrap_err());
        assert!(e.contains("partial_rotary_factor 1.5"), "{e}");
    }
}
