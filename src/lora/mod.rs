//! LoRA, as loralib/PEFT define it: `y = W x + scale · B (A dropout(x))` on a frozen base `W`
//! (dense or NF4), with `A: [r, in]`, `B: [out, r]` trainable and kept in f32 master precision (cast
//! to the compute dtype in the forward), `scale = α / r` (or `α / √r` with rsLoRA). `A` starts
//! kaiming-uniform(a=√5), i.e. U(−1/√in, 1/√in), and `B` at zero, so a fresh adapter leaves the
//! model's output unchanged. Only adapters are trainable: they alone are [`Var`]s.
//!
//! - [`attach`]: adapters onto a model (fresh or loaded) and back out.
//! - [`convert`]: an adapter moved between the fused and the split layout, exactly.
//! - [`peft`]: the adapter on disk in PEFT's format (save, and load with `strict = false`).

pub mod attach;
pub mod convert;
pub mod dora;
pub mod peft;

pub use dora::Dora;

use crate::model::linear::BaseWeight;
use crate::model::names::{self, Layout};
use anyhow::{Result, bail};
use candle_core::{DType, Tensor, Var};
pub use qlora_quant::fused::{DropoutSpec, MaskRows};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The embedding as a LoRA target (PEFT's `lora.Embedding`; see [`EmbedLora`]).
pub const EMBED_TARGET: &str = "embed_tokens";
/// The head as a LoRA target (an ordinary LoRA linear over the dense head, fused into the loss
/// pass).
pub const HEAD_TARGET: &str = "lm_head";

/// The modules `lora.modules_to_save` may name (PEFT's names), in model order.
pub const SAVABLE_MODULES: [&str; 2] = ["embed_tokens", "lm_head"];

/// Phi-3's LoRA targets (PEFT module names), in model order.
pub const TARGETS: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Every target name of either layout ([`Layout::Fused`]'s, then [`Layout::Split`]'s parts).
pub fn all_target_names() -> Vec<&'static str> {
    let mut all = Layout::Fused.targets();
    for t in Layout::Split.targets() {
        if !all.contains(&t) {
            all.push(t);
        }
    }
    all
}

/// Which linears get adapters and how big they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r.
    pub r: usize,
    /// α; the update is scaled by α / r (α / √r with rsLoRA).
    pub alpha: f64,
    /// Dropout on the adapter's input, during training only.
    pub dropout: f32,
    /// Subset of qkv_proj, o_proj, gate_up_proj, down_proj (on a split checkpoint also q_proj,
    /// k_proj, v_proj, gate_proj, up_proj); "all-linear" means every linear.
    pub targets: Vec<String>,
    /// rsLoRA scaling α / √r.
    pub rslora: bool,
    /// DoRA (weight-decomposed LoRA, PEFT's `use_dora`): a trained magnitude per output row
    /// rescales each row of `W + s·B·A` to it (see [`Dora`]).
    #[serde(default)]
    pub use_dora: bool,
    /// Full trainable copies (PEFT's `modules_to_save`): any of `embed_tokens`, `lm_head`.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Rows of the embedding that train (PEFT's `trainable_token_indices`): a list, or a map
    /// `{ embed_tokens = [...] }`.
    #[serde(default)]
    pub trainable_token_indices: TokenIndices,
}

/// `lora.trainable_token_indices`, as PEFT accepts it: a list of token ids (the input
/// embedding's rows), or a map from module name to its list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIndices {
    List(Vec<u32>),
    PerModule(std::collections::BTreeMap<String, Vec<u32>>),
}

impl Default for TokenIndices {
    fn default() -> Self {
        Self::List(Vec::new())
    }
}

impl TokenIndices {
    /// The embedding rows that train, checked: only `embed_tokens` may be named (qlora trains an
    /// untied head's rows as a whole `modules_to_save` copy), no id twice.
    pub fn embedding_rows(&self) -> Result<Vec<u32>> {
        let rows = match self {
            Self::List(v) => v.clone(),
            Self::PerModule(m) => {
                let mut rows = Vec::new();
                for (module, v) in m {
                    if module != "embed_tokens" {
                        bail!(
                            "lora.trainable_token_indices names `{module}`: only `embed_tokens`'s rows \
                             can train alone here; train a head with lora.modules_to_save = [\"lm_head\"]"
                        );
                    }
                    rows.extend(v);
                }
                rows
            }
        };
        let mut seen = std::collections::BTreeSet::new();
        if let Some(d) = rows.iter().find(|r| !seen.insert(**r)) {
            bail!("lora.trainable_token_indices lists token {d} twice");
        }
        Ok(rows)
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
            rslora: false,
            use_dora: false,
            modules_to_save: Vec::new(),
            trainable_token_indices: TokenIndices::default(),
        }
    }
}

impl LoraConfig {
    /// The update's scale.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether `lm_head` is a LoRA target ("all-linear" does not include the output layer, as in
    /// PEFT).
    pub fn head_targeted(&self) -> bool {
        self.targets.iter().any(|t| t == HEAD_TARGET)
    }

    /// Whether `embed_tokens` is a LoRA target ("all-linear" does not include it, as in PEFT).
    pub fn embedding_targeted(&self) -> bool {
        self.targets.iter().any(|t| t == EMBED_TARGET)
    }

    /// Checks the target names without a model: each one of either layout, or "all-linear".
    pub fn check_targets(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora r must be at least 1");
        }
        for m in &self.modules_to_save {
            if !SAVABLE_MODULES.contains(&m.as_str()) {
                bail!(
                    "lora.modules_to_save: `{m}` is not a module qlora can train a full copy of; use \
                     any of {SAVABLE_MODULES:?}"
                );
            }
        }
        let rows = self.trainable_token_indices.embedding_rows()?;
        if !rows.is_empty() && self.modules_to_save.iter().any(|m| m == "embed_tokens") {
            bail!(
                "lora.trainable_token_indices trains rows of embed_tokens, which \
                 lora.modules_to_save already trains whole: keep one of them"
            );
        }
        if self.targets.is_empty() {
            bail!("lora targets is empty: name some of {TARGETS:?} or \"all-linear\"");
        }
        let all = all_target_names();
        if self.embedding_targeted() {
            if self.modules_to_save.iter().any(|m| m == EMBED_TARGET) {
                bail!(
                    "lora targets embed_tokens, which lora.modules_to_save already trains whole: \
                     keep one of them"
                );
            }
            if !rows.is_empty() {
                bail!(
                    "lora targets embed_tokens and lora.trainable_token_indices trains some of its \
                     rows: keep one of them"
                );
            }
        }
        if self.head_targeted() {
            if self.modules_to_save.iter().any(|m| m == HEAD_TARGET) {
                bail!(
                    "lora targets lm_head, which lora.modules_to_save already trains whole: keep \
                     one of them"
                );
            }
            if self.use_dora {
                bail!("DoRA on lm_head is not built: drop lm_head from lora.targets, or use_dora");
            }
        }
        for t in &self.targets {
            if t != "all-linear"
                && t != EMBED_TARGET
                && t != HEAD_TARGET
                && !all.contains(&t.as_str())
            {
                bail!("unknown lora target `{t}`: use some of {all:?} or \"all-linear\"");
            }
        }
        Ok(())
    }

    /// The targeted module names of a checkpoint of `layout`, validated, in model order:
    /// "all-linear" is every linear; on a split checkpoint `qkv_proj` and `gate_up_proj` stand for
    /// their parts (so the default targets mean the same on both). A split name on a fused
    /// checkpoint is refused: part of a fused weight cannot carry its own PEFT adapter.
    pub fn target_names(&self, layout: Layout) -> Result<Vec<&'static str>> {
        self.check_targets()?;
        let own = layout.targets();
        if self.targets.iter().any(|t| t == "all-linear") {
            return Ok(own);
        }
        let mut out: Vec<&'static str> = Vec::new();
        for t in &self.targets {
            let t = t.as_str();
            if t == EMBED_TARGET || t == HEAD_TARGET {
                continue;
            }
            let expanded: Vec<&'static str> = if let Some(k) = own.iter().find(|k| **k == t) {
                vec![*k]
            } else if layout == Layout::Split && !names::split_parts(t).is_empty() {
                names::split_parts(t).to_vec()
            } else {
                let fused = names::fused_of(t).unwrap_or("?");
                bail!(
                    "lora target `{t}` is a module of split-layout (llamafied) checkpoints; this \
                     checkpoint has the fused `{fused}`: target `{fused}` instead"
                );
            };
            for k in expanded {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        Ok(own.into_iter().filter(|t| out.contains(t)).collect())
    }
}

/// One adapter pair on one linear.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The Hugging Face module path, e.g. `model.layers.0.self_attn.qkv_proj`.
    pub module: String,
    /// `[r, in]`, f32.
    pub a: Var,
    /// `[out, r]`, f32.
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
    /// Distinguishes this adapter's dropout stream from the others'.
    pub dropout_stream: u64,
    /// DoRA's magnitude (`lora.use_dora`), else plain LoRA.
    pub dora: Option<Dora>,
}

impl Adapter {
    /// A fresh adapter: `A ~ U(−1/√in, 1/√in)` (kaiming-uniform, a = √5), `B = 0`, in `master`
    /// precision (see [`master_dtype`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        module: String,
        out: usize,
        inp: usize,
        cfg: &LoraConfig,
        rng: &mut impl Rng,
        stream: u64,
        master: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Self {
            module,
            a: Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), device)?.to_dtype(master)?)?,
            b: Var::zeros((out, cfg.r), master, device)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            dropout_stream: stream,
            dora: None,
        })
    }

    /// The trainable variables, in a fixed order: `A`, `B`, then DoRA's magnitude.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.a.clone(), self.b.clone()];
        if let Some(d) = &self.dora {
            v.push(d.magnitude.clone());
        }
        v
    }

    /// This adapter's dropout in a training forward (`ctx` has a seed and `p > 0`), else `None`.
    /// The stream is mixed, not xored, into the seed: the mask hashes `seed ^ c·φ` per counter
    /// c, so streams xored with multiples of φ would share mask bits at shifted counters.
    pub fn dropout_for(&self, ctx: &ForwardCtx) -> Option<DropoutSpec> {
        match (ctx.dropout_seed, self.dropout > 0.0) {
            (Some(seed), true) => Some(DropoutSpec {
                p: self.dropout,
                seed: mix_seed(seed, self.dropout_stream),
                rows: ctx.mask_rows,
            }),
            _ => None,
        }
    }

    /// `scale · (dropout(x) · Aᵀ) · Bᵀ` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        match self.dropout_for(ctx) {
            Some(d) => self.product(&qlora_quant::fused::dropout_rows(x, d.p, d.seed, d.rows)?),
            None => self.product(x),
        }
    }

    /// `scale · (x · Aᵀ) · Bᵀ` in `x`'s dtype (no dropout).
    pub fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (r, inp) = self.a.dims2()?;
        let out = self.b.dim(0)?;
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("x has dims") = out;
        let x2 = x.reshape(((), inp))?;
        let a = self.a.as_tensor().to_dtype(dtype)?;
        // The scale folded into the small [out, r] B (in master precision) rather than applied to
        // the [tokens, out] product: one pass over the activations fewer.
        let b = (self.b.as_tensor() * self.scale)?.to_dtype(dtype)?;
        let h = x2.matmul(&a.t()?)?;
        debug_assert_eq!(h.dim(1)?, r);
        h.matmul(&b.t()?)?.reshape(out_dims)
    }

    /// `scale · B · A`, f32 `[out, in]`.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

/// Master precision of adapters for a compute dtype: f32, except f64 models (gradient checks) whose
/// adapters are f64 too.
pub fn master_dtype(compute: DType) -> DType {
    if compute == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// LoRA on the embedding, as PEFT's `lora.Embedding`: `A: [r, V]` (zeros at init), `B: [H, r]`
/// (N(0, 1) at init), and the embedding of token `t` gains `scale · B · A[:, t]`
/// (`F.embedding(ids, Aᵀ) · Bᵀ · scale`); no dropout, the padding token's column never trained.
#[derive(Debug, Clone)]
pub struct EmbedLora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

impl EmbedLora {
    /// A fresh one: `A = 0`, `B ~ N(0, 1)` from `rng`, in `master` precision.
    pub fn new(
        vocab: usize,
        hidden: usize,
        cfg: &LoraConfig,
        rng: &mut impl Rng,
        master: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let normal = rand_distr::StandardNormal;
        let b: Vec<f32> = (0..hidden * cfg.r)
            .map(|_| rng.sample::<f32, _>(normal))
            .collect();
        Ok(Self {
            a: Var::zeros((cfg.r, vocab), master, device)?,
            b: Var::from_tensor(&Tensor::from_vec(b, (hidden, cfg.r), device)?.to_dtype(master)?)?,
            scale: cfg.scale(),
        })
    }

    /// `scale · Aᵀ[ids] · Bᵀ` for flat `ids: [N]`, `[N, H]` in `dtype`.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let at = self.a.as_tensor().t()?.to_dtype(dtype)?; // [V, r]
        let b = (self.b.as_tensor() * self.scale)?.to_dtype(dtype)?;
        at.contiguous()?.index_select(ids, 0)?.matmul(&b.t()?)
    }

    /// `scale · Aᵀ · Bᵀ`, f32 `[V, H]`: what a merge adds to the embedding.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.a.as_tensor().t()?.matmul(&self.b.as_tensor().t()?)? * self.scale
    }
}

/// Per-forward settings shared by every layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardCtx {
    /// `Some(seed)` in training: adapter dropout draws its masks from this seed (mixed with each
    /// adapter's stream) with `qlora_quant::fused::dropout`'s counter-based generator, computed
    /// where the activations live (the same bits on the CPU and on CUDA), so a recomputed forward
    /// (gradient checkpointing) draws the same masks.
    pub dropout_seed: Option<u64>,
    /// Where the batch's rows sit among the step's global rows (dim 0 of the activations): the
    /// dropout masks are numbered by global row, so they do not depend on the batch a row is in,
    /// its padding, or the number of data-parallel ranks.
    pub mask_rows: MaskRows,
}

/// Two seeds into one (a bijection in `a` for each `b`; distinct `b` land far apart).
pub fn mix_seed(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_mul(0xD1B5_4A32_D192_ED03)
        .rotate_left(29)
}

/// A linear layer: a frozen base and an optional adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: BaseWeight,
    pub adapter: Option<Adapter>,
}

impl LoraLinear {
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let Some(a) = &self.adapter else {
            return self.base.forward(x);
        };
        match a.dora_scale(&self.base, x.dtype())? {
            None => self.base.forward(x)? + a.forward(x, ctx)?,
            Some(g) => self.dora_forward(a, x, &g, ctx),
        }
    }

    /// DoRA's forward with its row factor `g` ([`dora`]): `g ⊙ (W x + s·B·A x)`, or with dropout
    /// PEFT's `W x + (g − 1) ⊙ (W·drop(x)) + g ⊙ s·B·A·drop(x)`.
    fn dora_forward(
        &self,
        a: &Adapter,
        x: &Tensor,
        g: &Tensor,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        match a.dropout_for(ctx) {
            None => (self.base.forward(x)? + a.product(x)?)?.broadcast_mul(g),
            Some(d) => {
                let xd = qlora_quant::fused::dropout_rows(x, d.p, d.seed, d.rows)?;
                let y = self.base.forward(x)?;
                let extra = self
                    .base
                    .forward(&xd)?
                    .broadcast_mul(&g.affine(1.0, -1.0)?)?;
                (y + extra)? + a.product(&xd)?.broadcast_mul(g)?
            }
        }
    }

    /// [`Self::forward`] as one op where there is one: on the CPU in f32, an NF4 base with an
    /// adapter runs as [`qlora_quant::fused::lora_nf4_linear`] (the adapter's product accumulated
    /// into the base's output, one backward for both: the same function with fewer passes; a DoRA
    /// adapter without dropout scales its output by `g`); anything else takes the composition.
    pub fn forward_fused(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.forward_fused_known(x, ctx, None)
    }

    /// Whether [`Self::forward_fused`] runs as the one op that can take its output back
    /// ([`Self::forward_fused_known`]): an NF4 base with a plain (not DoRA) adapter, an even input
    /// width, `x` f32 on the CPU.
    pub fn replayable(&self, x: &Tensor) -> bool {
        matches!(
            (&self.base, &self.adapter),
            (BaseWeight::Nf4(_), Some(a)) if a.dora.is_none() && a.a.dims()[1] % 2 == 0
        ) && x.device().is_cpu()
            && x.dtype() == DType::F32
    }

    /// [`Self::forward_fused`] with its output `known` from an earlier forward of the same input
    /// (selective recomputation): handed over instead of computed where the linear is
    /// [`Self::replayable`], else ignored (computed again, the same values).
    pub fn forward_fused_known(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        known: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let (BaseWeight::Nf4(w), Some(a)) = (&self.base, &self.adapter)
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && a.a.dim(1)? % 2 == 0
        {
            let fused = |dropout, known| {
                qlora_quant::fused::lora_nf4_linear_known(
                    x,
                    w,
                    a.a.as_tensor(),
                    a.b.as_tensor(),
                    a.scale as f32,
                    dropout,
                    known,
                )
            };
            return match (a.dora_scale(&self.base, x.dtype())?, a.dropout_for(ctx)) {
                (None, dropout) => fused(dropout, known),
                (Some(g), None) => fused(None, None)?.broadcast_mul(&g),
                (Some(g), Some(_)) => self.dora_forward(a, x, &g, ctx),
            };
        }
        self.forward(x, ctx)
    }

    /// The merged weight as a dense f32 tensor (W dequantized when NF4): `W + scale · B·A`, and
    /// for DoRA PEFT's `diag(m / ‖W + ΔW‖_row)·(W + ΔW)`.
    pub fn merged(&self) -> candle_core::Result<Tensor> {
        let w = self.base.to_dense(DType::F32)?;
        let Some(a) = &self.adapter else {
            return Ok(w);
        };
        let w = (w + a.delta()?.to_dtype(DType::F32)?)?;
        match &a.dora {
            None => Ok(w),
            Some(d) => dora::merge(&w, d.magnitude.as_tensor()),
        }
    }
}
