//! Phi-3 (transformers' `Phi3ForCausalLM`), one implementation for every base: each block linear is
//! a [`LoraLinear`] over a dense or NF4 [`BaseWeight`]. RMSNorm, rotate-half RoPE, attention and
//! SwiGLU are `qlora_quant::fused`'s differentiable ops: on the CPU the plain candle compositions
//! (transformers' arithmetic, differentiated by candle), on CUDA fused kernels with their own
//! backward (attention in O(T) memory, grouped-query heads read without expanding k and v). Fused
//! `qkv_proj` (rows Q | K | V) and `gate_up_proj` (rows gate | up, `up · silu(gate)`) stay fused so
//! adapter names are PEFT's; a split ("llamafied") checkpoint keeps its `q_proj` … `up_proj` apart,
//! each with its own adapter, and their outputs are concatenated into the same rows.
//!
//! Shapes: `B` batch, `T` tokens, `H` hidden, `h`/`kv` query/key-value heads of `d` dims.

use super::config::{Phi3Config, RopeConfig};
use super::linear::BaseWeight;
use super::rope;
use crate::lora::{Adapter, ForwardCtx, LoraLinear};
use candle_core::{D, DType, Device, Result, Tensor};
use qlora_quant::fused;

/// What a block's forward does with its expensive outputs (selective recomputation: see
/// `train::grads`).
#[derive(Debug)]
pub enum Tap<'a> {
    /// Nothing kept.
    Off,
    /// Keep the attention's output and the gate/up projection's, each where its op can take it
    /// back ([`OpPath::replays_attention`], [`OpPath::replays_linear`]).
    Record(&'a mut Kept),
    /// A recomputation of the same forward: the kept outputs are handed over, not computed.
    Replay(&'a Kept),
}

/// The outputs a [`Tap::Record`] kept: the attention's (`[B, h, T, d]`, before the heads are
/// merged) and each gate/up part's (`None` where the op cannot take it back).
#[derive(Debug, Clone, Default)]
pub struct Kept {
    pub attention: Option<Tensor>,
    pub gate_up: Vec<Option<Tensor>>,
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Tensor,
    /// The rows Q | K | V: Phi-3's one `qkv_proj`, or a split checkpoint's `q_proj`, `k_proj`,
    /// `v_proj` (outputs concatenated), each with its PEFT target name.
    pub qkv: Vec<(&'static str, LoraLinear)>,
    pub o_proj: LoraLinear,
    pub post_attention_layernorm: Tensor,
    /// The rows gate | up: `gate_up_proj`, or `gate_proj` and `up_proj`.
    pub gate_up: Vec<(&'static str, LoraLinear)>,
    pub down_proj: LoraLinear,
}

impl Block {
    /// The block's linears with their PEFT target names, in model order.
    pub fn linears(&self) -> Vec<(&'static str, &LoraLinear)> {
        let mut out: Vec<_> = self.qkv.iter().map(|(n, l)| (*n, l)).collect();
        out.push(("o_proj", &self.o_proj));
        out.extend(self.gate_up.iter().map(|(n, l)| (*n, l)));
        out.push(("down_proj", &self.down_proj));
        out
    }

    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut LoraLinear)> {
        let mut out: Vec<_> = self.qkv.iter_mut().map(|(n, l)| (*n, l)).collect();
        out.push(("o_proj", &mut self.o_proj));
        out.extend(self.gate_up.iter_mut().map(|(n, l)| (*n, l)));
        out.push(("down_proj", &mut self.down_proj));
        out
    }

    /// The linear named `target`, if the block has it.
    pub fn linear(&self, target: &str) -> Option<&LoraLinear> {
        self.linears()
            .into_iter()
            .find(|(n, _)| *n == target)
            .map(|(_, l)| l)
    }
}

/// What a batch needs beyond its embeddings: rotary tables and the additive attention mask.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `[B, 1, T, r]`, `r` the rotated dims of a head (`d`, or fewer with a partial rotary factor).
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[B, 1, T, T_keys]`, 0 where attention is allowed, −∞ elsewhere.
    pub mask: Tensor,
}

/// Keys and values of the tokens seen so far, per layer (`[B, kv, T_past, d]`).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens already in the cache.
    pub len: usize,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Phi3 {
    pub cfg: Phi3Config,
    pub rope: RopeConfig,
    /// `[V, H]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// `[V, H]` (the embedding itself when tied).
    pub lm_head: Tensor,
    pub dtype: DType,
    pub device: Device,
    /// Composed or fused ops ([`OpPath::for_device`] unless a test picks).
    pub ops: OpPath,
    /// Trainable full copies of the embedding and the head (`lora.modules_to_save`).
    pub saved: SavedModules,
}

/// PEFT's `modules_to_save` copies: when present they replace the frozen `embed_tokens` /
/// `lm_head` in the forward, trained in f32 master precision.
#[derive(Debug, Clone, Default)]
pub struct SavedModules {
    /// `[V, H]`.
    pub embed: Option<candle_core::Var>,
    /// `[V, H]`.
    pub head: Option<candle_core::Var>,
    /// Trained rows of the embedding (`lora.trainable_token_indices`).
    pub tokens: Option<TrainableTokens>,
    /// LoRA on the embedding (`embed_tokens` among `lora.targets`).
    pub embed_lora: Option<crate::lora::EmbedLora>,
    /// LoRA on the head (`lm_head` among `lora.targets`): `A [r, H]`, `B [V, r]`.
    pub head_lora: Option<Adapter>,
}

/// PEFT's TrainableTokensLayer on the embedding: the rows `indices` are replaced by `delta`
/// (which starts as those rows and trains; PEFT's `trainable_tokens_delta` holds the rows
/// themselves, not differences).
#[derive(Debug, Clone)]
pub struct TrainableTokens {
    pub indices: Vec<u32>,
    /// `[indices.len(), H]`, master precision.
    pub delta: candle_core::Var,
}

impl TrainableTokens {
    /// For each position of `ids`, the row of `delta` that replaces its embedding, if any.
    pub fn rows_of(&self, ids: &[u32]) -> Vec<Option<u32>> {
        let map: std::collections::HashMap<u32, u32> = self
            .indices
            .iter()
            .enumerate()
            .map(|(k, &t)| (t, k as u32))
            .collect();
        ids.iter().map(|t| map.get(t).copied()).collect()
    }
}

/// Which implementation the ops between the linears take (RMSNorm, RoPE, attention, SwiGLU and
/// the head's cross-entropy), and on the CPU in f32 also the block linears with their adapters
/// (one op each) and the head's loss with its gradient (one pass). All are differentiable and
/// compute the same function; they differ in arithmetic order within f32 rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpPath {
    /// candle compositions of primitive ops, transformers' arithmetic (any dtype, f64 included).
    Composed,
    /// `qlora_quant::fused`'s custom ops: CUDA kernels with their own backward, or the same
    /// loops on the CPU (f32, bf16, f16; the default there too), tested against
    /// [`OpPath::Composed`].
    Fused(FusedAttention),
}

/// The attention of [`OpPath::Fused`]; both keep O(chunk) or O(T) memory instead of the
/// composition's `[heads, T, Tk]` probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedAttention {
    /// Chunks of heads × query rows through the device's matmul (tensor cores on CUDA) and the
    /// fused masked softmax (`fused::attention_blocked`).
    Blocked,
    /// One kernel per pass streaming keys with an online softmax, CUDA cores only
    /// (`fused::attention_fused`): O(T) memory, head dims ≤ 256.
    Streaming,
}

impl OpPath {
    /// Fused with blocked attention for the dtypes the fused ops have (f32, bf16, f16), on CUDA
    /// (our kernels) and on the CPU (our loops, rows in parallel on rayon: one pass per op instead
    /// of one per candle primitive); composed for f64 (the finite-difference checks).
    pub fn for_device(_device: &Device, dtype: DType) -> Self {
        if matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            Self::Fused(FusedAttention::Blocked)
        } else {
            Self::Composed
        }
    }

    /// A block linear with its adapter ([`LoraLinear::forward_fused`] on the fused path).
    pub fn linear(self, lin: &LoraLinear, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.linear_known(lin, x, ctx, None)
    }

    /// [`Self::linear`] with its output `known` from an earlier forward (selective recomputation;
    /// used where [`Self::replays_linear`]).
    pub fn linear_known(
        self,
        lin: &LoraLinear,
        x: &Tensor,
        ctx: &ForwardCtx,
        known: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            Self::Composed => lin.forward(x, ctx),
            Self::Fused(_) => lin.forward_fused_known(x, ctx, known),
        }
    }

    /// Whether this path's linear can take its output back instead of computing it.
    pub fn replays_linear(self, lin: &LoraLinear, x: &Tensor) -> bool {
        matches!(self, Self::Fused(_)) && lin.replayable(x)
    }

    /// Whether this path's attention can take its output back instead of computing it (the fused
    /// ops: their backward reads q, k, v and the output only).
    pub fn replays_attention(self) -> bool {
        matches!(self, Self::Fused(_))
    }

    /// `weight · x / √(mean(x²) + eps)`, in f32 for half types, cast back before the weight.
    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            Self::Composed => fused::rms_norm_ref(x, weight, eps),
            Self::Fused(_) => fused::rms_norm_fused(x, weight, eps),
        }
    }

    /// Rotate-half RoPE of `x [B, heads, T, d]` with tables `[B, 1, T, r]`.
    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self {
            Self::Composed => fused::rope_ref(x, cos, sin),
            Self::Fused(_) => fused::rope_fused(x, cos, sin),
        }
    }

    /// `softmax(q·kᵀ · scale + mask) · v`, grouped-query heads included (k, v unexpanded); with
    /// `known`, the output of an earlier forward of the same inputs, where
    /// [`Self::replays_attention`].
    pub fn attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
        known: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            Self::Composed => fused::attention_ref(q, k, v, Some(mask), scale),
            // The model's masks are causal (Phi3::prepare): key blocks past a row block's last
            // visible key are skipped.
            Self::Fused(FusedAttention::Blocked) => fused::attention_blocked_known(
                q,
                k,
                v,
                Some(mask),
                scale,
                fused::Blocking::for_device(q.device(), true),
                known,
            ),
            Self::Fused(FusedAttention::Streaming) => {
                fused::attention_fused_known(q, k, v, Some(mask), scale, known)
            }
        }
    }

    /// `up · silu(gate)` of `gu = gate | up`.
    pub fn swiglu(self, gu: &Tensor) -> Result<Tensor> {
        match self {
            Self::Composed => fused::swiglu_ref(gu),
            Self::Fused(_) => fused::swiglu_fused(gu),
        }
    }

    /// Per-row cross-entropy of `logits [N, V]` against u32 `targets [N]` (f32; f64 stays f64).
    pub fn cross_entropy(self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self {
            Self::Composed => fused::cross_entropy_ref(logits, targets),
            Self::Fused(_) => fused::cross_entropy_fused(logits, targets),
        }
    }
}

impl Phi3 {
    /// Rotary tables and mask for token `positions` (u32 `[B, T]`) and optional `segments`
    /// (u32 `[B, T]`: tokens attend only within their segment, for packed sequences), with
    /// `past` cached tokens before them (generation).
    pub fn prepare(
        &self,
        positions: &Tensor,
        segments: Option<&Tensor>,
        past: usize,
    ) -> Result<Prepared> {
        let (cos, sin) = rope::cos_sin(&self.rope, positions, self.dtype)?;
        let (b, t) = positions.dims2()?;
        let seg: Option<Vec<Vec<u32>>> = segments.map(|s| s.to_vec2()).transpose()?;
        let window = self.cfg.sliding_window;
        let tk = past + t;
        let mut mask = vec![0f32; b * t * tk];
        for bi in 0..b {
            for i in 0..t {
                let qi = past + i;
                for j in 0..tk {
                    let causal = j <= qi;
                    let same = match &seg {
                        Some(s) if j >= past => s[bi][j - past] == s[bi][i],
                        _ => true,
                    };
                    // transformers' sliding window: key j visible from query i when i - j < window.
                    let in_window = window.is_none_or(|w| qi - j.min(qi) < w);
                    if !(causal && same && in_window) {
                        mask[(bi * t + i) * tk + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, tk), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        Ok(Prepared { cos, sin, mask })
    }

    /// Token embeddings `[B, T, H]` (from the trainable copy when there is one).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let table = match &self.saved.embed {
            Some(v) => v.as_tensor().to_dtype(self.dtype)?,
            None => self.embed_tokens.clone(),
        };
        let flat = ids.flatten_all()?;
        let rows = table.index_select(&flat, 0)?;
        let rows = match &self.saved.tokens {
            None => rows,
            Some(tt) => {
                // Positions of trained tokens take their delta row: `rows·(1 − m) + delta[k]·m`.
                let ids_v: Vec<u32> = flat.to_vec1()?;
                let which = tt.rows_of(&ids_v);
                if which.iter().all(Option::is_none) {
                    rows
                } else {
                    let k: Vec<u32> = which.iter().map(|w| w.unwrap_or(0)).collect();
                    let m: Vec<f32> = which
                        .iter()
                        .map(|w| f32::from(u8::from(w.is_some())))
                        .collect();
                    let n = k.len();
                    let k = Tensor::from_vec(k, n, &self.device)?;
                    let m = Tensor::from_vec(m, (n, 1), &self.device)?.to_dtype(self.dtype)?;
                    let tok = tt
                        .delta
                        .as_tensor()
                        .to_dtype(self.dtype)?
                        .index_select(&k, 0)?;
                    (rows.broadcast_mul(&m.affine(-1.0, 1.0)?)? + tok.broadcast_mul(&m)?)?
                }
            }
        };
        let rows = match &self.saved.embed_lora {
            Some(e) => (rows + e.rows(&flat, self.dtype)?)?,
            None => rows,
        };
        rows.reshape((b, t, self.cfg.hidden_size))
    }

    /// The head's weight `[V, H]` in the compute dtype (the trainable copy when there is one).
    pub fn head_weight(&self) -> Result<Tensor> {
        match &self.saved.head {
            Some(v) => v.as_tensor().to_dtype(self.dtype),
            None => Ok(self.lm_head.clone()),
        }
    }

    /// Decoder block `layer` on `x: [B, T, H]`.
    pub fn block(
        &self,
        layer: usize,
        x: &Tensor,
        prep: &Prepared,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.block_tapped(layer, x, prep, ctx, cache, Tap::Off)
    }

    /// [`Self::block`] keeping its expensive outputs ([`Tap::Record`]) or taking them back
    /// ([`Tap::Replay`]): selective recomputation.
    pub fn block_with(
        &self,
        layer: usize,
        x: &Tensor,
        prep: &Prepared,
        ctx: &ForwardCtx,
        tap: Tap<'_>,
    ) -> Result<Tensor> {
        self.block_tapped(layer, x, prep, ctx, None, tap)
    }

    fn block_tapped(
        &self,
        layer: usize,
        x: &Tensor,
        prep: &Prepared,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
        mut tap: Tap<'_>,
    ) -> Result<Tensor> {
        let blk = &self.layers[layer];
        let eps = self.cfg.rms_norm_eps;
        let h = self.ops.rms_norm(x, &blk.input_layernorm, eps)?;
        let attn = self.attention(layer, &h, prep, ctx, cache, &mut tap)?;
        let x = (x + attn)?;
        let h = self.ops.rms_norm(&x, &blk.post_attention_layernorm, eps)?;
        let gu = self.projection(&blk.gate_up, &h, ctx, &mut tap)?;
        let mlp = self
            .ops
            .linear(&blk.down_proj, &self.ops.swiglu(&gu)?, ctx)?;
        x + mlp
    }

    /// A fused projection's output, or a split one's parts concatenated (the same rows); the
    /// gate/up projection's parts kept or replayed through `tap` (the only projection given one).
    fn projection(
        &self,
        parts: &[(&'static str, LoraLinear)],
        x: &Tensor,
        ctx: &ForwardCtx,
        tap: &mut Tap<'_>,
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(parts.len());
        for (i, (_, lin)) in parts.iter().enumerate() {
            let y = match tap {
                Tap::Off => self.ops.linear(lin, x, ctx)?,
                Tap::Record(kept) => {
                    let y = self.ops.linear(lin, x, ctx)?;
                    kept.gate_up
                        .push(self.ops.replays_linear(lin, x).then(|| y.detach()));
                    y
                }
                Tap::Replay(kept) => {
                    let known = kept.gate_up.get(i).and_then(Option::as_ref);
                    self.ops.linear_known(lin, x, ctx, known)?
                }
            };
            outs.push(y);
        }
        match outs.len() {
            1 => Ok(outs.pop().expect("one part")),
            _ => Tensor::cat(&outs, D::Minus1),
        }
    }

    fn attention(
        &self,
        layer: usize,
        x: &Tensor,
        prep: &Prepared,
        ctx: &ForwardCtx,
        cache: Option<&mut KvCache>,
        tap: &mut Tap<'_>,
    ) -> Result<Tensor> {
        let blk = &self.layers[layer];
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads,
            self.cfg.num_kv_heads(),
            self.cfg.head_dim(),
        );
        let qkv = self.projection(&blk.qkv, x, ctx, &mut Tap::Off)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, start * d, n * d)?
                .reshape((b, t, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = self.ops.rope(&heads(0, nh)?, &prep.cos, &prep.sin)?;
        let k = self.ops.rope(&heads(nh, nkv)?, &prep.cos, &prep.sin)?;
        let v = heads(nh + nkv, nkv)?;
        let (k, v) = match cache {
            Some(cache) => {
                let entry = &mut cache.layers[layer];
                let kv = match entry.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *entry = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        // Grouped-query heads: query head h reads key/value head h / (nh / nkv).
        let scale = 1.0 / (d as f64).sqrt();
        let known = match tap {
            Tap::Replay(kept) => kept.attention.as_ref(),
            _ => None,
        };
        let out = self.ops.attention(&q, &k, &v, &prep.mask, scale, known)?;
        if let Tap::Record(kept) = tap {
            kept.attention = self.ops.replays_attention().then(|| out.detach());
        }
        let out = out.transpose(1, 2)?.reshape((b, t, nh * d))?;
        self.ops.linear(&blk.o_proj, &out, ctx)
    }

    /// Final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.ops.rms_norm(x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits `[.., V]` of normed hidden states `[.., H]`.
    pub fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        let y = self.lm_head_base(h)?;
        match &self.saved.head_lora {
            Some(a) => y + a.product(h)?,
            None => Ok(y),
        }
    }

    /// The head's own product `h · Wᵀ` (its LoRA, if any, not added).
    pub fn lm_head_base(&self, h: &Tensor) -> Result<Tensor> {
        BaseWeight::Dense(self.head_weight()?).forward(h)
    }

    /// Normed hidden states `[B, T, H]` of a batch (the trunk, before the vocabulary projection).
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        segments: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let prep = self.prepare(positions, segments, 0)?;
        let mut x = self.embed(ids)?;
        for layer in 0..self.layers.len() {
            x = self.block(layer, &x, &prep, ctx, None)?;
        }
        self.final_norm(&x)
    }

    /// Logits for every position, `[B, T, V]`, with positions `0..T`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let positions = default_positions(ids)?;
        self.lm_head(&self.hidden(ids, &positions, None, &ForwardCtx::default())?)
    }

    /// Logits `[B, T, V]` of new tokens `ids` after the cached ones, extending the cache.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache {
                layers: vec![None; self.layers.len()],
                len: 0,
            };
        }
        let pos: Vec<u32> = (0..b)
            .flat_map(|_| (cache.len..cache.len + t).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(pos, (b, t), &self.device)?;
        let prep = self.prepare(&positions, None, cache.len)?;
        let ctx = ForwardCtx::default();
        let mut x = self.embed(ids)?;
        for layer in 0..self.layers.len() {
            x = self.block(layer, &x, &prep, &ctx, Some(cache))?;
        }
        cache.len += t;
        self.lm_head(&self.final_norm(&x)?)
    }

    /// Every trainable variable, in a fixed order: each adapter's ([`Self::adapters`]' order)
    /// [`Adapter::vars`], then the head's LoRA `A` and `B`, the embedding's LoRA `A` and `B`, the
    /// embedding's copy, the trained token rows and the head's copy ([`SavedModules`]). Gradients ([`crate::train::LossAndGrads`]) and optimizer states align
    /// with it.
    pub fn trainable_vars(&self) -> Vec<candle_core::Var> {
        let mut v: Vec<_> = self.adapters().iter().flat_map(|a| a.vars()).collect();
        if let Some(h) = &self.saved.head_lora {
            v.extend(h.vars());
        }
        if let Some(e) = &self.saved.embed_lora {
            v.push(e.a.clone());
            v.push(e.b.clone());
        }
        v.extend(self.saved.embed.clone());
        v.extend(self.saved.tokens.as_ref().map(|t| t.delta.clone()));
        v.extend(self.saved.head.clone());
        v
    }

    /// Every adapter of the model, in layer and target order.
    pub fn adapters(&self) -> Vec<&Adapter> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.linears()
                    .into_iter()
                    .filter_map(|(_, lin)| lin.adapter.as_ref())
            })
            .collect()
    }
}

/// Positions `0..T` for each row of `ids: [B, T]`.
pub fn default_positions(ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    Tensor::from_vec(pos, (b, t), ids.device())
}

/// The memory of [`Phi3::block`] as training runs it, for `qlora plan`: the same ops in the same
/// order as [`Phi3::block`], `Phi3::attention` and `Phi3::projection` (on the op path
/// [`OpPath::for_device`] picks), each with the storage it allocates and how candle's backward
/// allocates for it (see [`crate::plan::tape`]). Change one, change the other: the plan's tests
/// compare it with what the block allocates.
pub mod memory {
    use super::super::config::Phi3Config;
    use super::super::names::Layout;
    use crate::plan::tape::{Id, Kind, Tape};

    /// What a training step runs on.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Step {
        /// Rows and tokens per row.
        pub batch: usize,
        pub seq: usize,
        /// Bytes per value of the compute dtype.
        pub elem: usize,
        /// On the CPU, with this many pool threads; else on a GPU.
        pub cpu_threads: Option<usize>,
        /// NF4 base (else dense in the compute dtype).
        pub nf4: bool,
        /// The rank of the adapter of each target name that has one.
        pub adapted: Vec<(&'static str, usize)>,
        pub dropout: bool,
        /// DoRA on every adapter (`lora.use_dora`).
        pub dora: bool,
    }

    impl Step {
        fn rows(&self) -> u64 {
            (self.batch * self.seq) as u64
        }

        /// Bytes of `[rows, width]` in the compute dtype.
        fn act(&self, width: usize) -> u64 {
            self.rows() * (width * self.elem) as u64
        }

        fn rank(&self, target: &str) -> Option<usize> {
            self.adapted
                .iter()
                .find(|(t, _)| *t == target)
                .map(|&(_, r)| r)
        }
    }

    /// A block linear `target` (`[out, inp]`) on `x`, as [`super::OpPath::linear`] runs it.
    fn linear(
        t: &mut Tape,
        s: &Step,
        x: Id,
        target: &'static str,
        (out, inp): (usize, usize),
    ) -> Id {
        let f32b = |n: usize| (n * 4) as u64;
        let m = s.batch * s.seq;
        let r = s.rank(target);
        let cpu_f32 = s.cpu_threads.is_some() && s.elem == 4;
        let threads = s.cpu_threads.unwrap_or(1);
        if s.nf4 {
            let fused_op = !(s.dora && s.dropout);
            if let (Some(r), true, true, true) = (r, cpu_f32, inp % 2 == 0, fused_op) {
                // qlora_quant::fused::lora_nf4_linear: one op, x, A and B its arguments.
                let (fwd, bwd) = qlora_quant::fused::lora_nf4_linear_memory(
                    (m, out, inp, r),
                    s.dropout,
                    threads,
                );
                let a = t.var(f32b(r * inp));
                let b = t.var(f32b(out * r));
                let y = t.op(
                    Kind::Custom {
                        grads: vec![Some(s.act(inp)), Some(f32b(r * inp)), Some(f32b(out * r))],
                        bwd_transient: bwd,
                        fwd_transient: fwd,
                    },
                    &[x, a, b],
                    s.act(out),
                );
                return if s.dora {
                    let g = dora_factor(t, s, out);
                    row_scaled(t, s, y, g, out)
                } else {
                    y
                };
            }
            // qlora_quant::nf4_linear: dequantized tiles on the CPU, the whole weight on a GPU.
            let (fwd, bwd) = match s.cpu_threads {
                Some(n) => (
                    qlora_quant::op::nf4_tile_bytes(out, inp, true, n),
                    qlora_quant::op::nf4_tile_bytes(out, inp, false, n),
                ),
                None => ((out * inp * s.elem) as u64, (out * inp * s.elem) as u64),
            };
            let y = t.op(
                Kind::Custom {
                    grads: vec![Some(s.act(inp))],
                    bwd_transient: bwd,
                    fwd_transient: fwd,
                },
                &[x],
                s.act(out),
            );
            let yd = |t: &mut Tape, xd: Id| {
                t.op(
                    Kind::Custom {
                        grads: vec![Some(s.act(inp))],
                        bwd_transient: bwd,
                        fwd_transient: fwd,
                    },
                    &[xd],
                    s.act(out),
                )
            };
            return match r {
                Some(r) => adapter(t, s, x, y, (out, inp, r), yd),
                None => y,
            };
        }
        // Dense: x · Wᵀ through candle's matmul, which also computes (and keeps) W's gradient.
        let w = t.constant((out * inp * s.elem) as u64);
        let y = matmul_t(t, s, x, w, (out, inp));
        let yd = |t: &mut Tape, xd: Id| matmul_t(t, s, xd, w, (out, inp));
        match r {
            Some(r) => adapter(t, s, x, y, (out, inp, r), yd),
            None => y,
        }
    }

    /// DoRA's row factor `g = m / ‖W + s·B·A‖` (`[out]`, compute dtype): the magnitude a
    /// variable, the norm a detached constant (its `[r, out]` and `[r, r]` products are freed
    /// before the block's activations grow), the division and the cast.
    fn dora_factor(t: &mut Tape, s: &Step, out: usize) -> Id {
        let m = t.var((out * 4) as u64);
        let norm = t.constant((out * 4) as u64);
        let g = t.op(Kind::MulConst, &[m, norm], (out * 4) as u64);
        if s.elem == 4 {
            g
        } else {
            t.op(Kind::Affine, &[g], (out * s.elem) as u64)
        }
    }

    /// `y ⊙ g` with `g: [out]` broadcast over `y`'s rows.
    fn row_scaled(t: &mut Tape, s: &Step, y: Id, g: Id, out: usize) -> Id {
        let gb = t.view(Kind::Pass, g, s.act(out));
        t.op(Kind::Mul, &[y, gb], s.act(out))
    }

    /// `x · Wᵀ` through candle's matmul for `x: [rows, inp]` and `w: [out, inp]` (a transposed view,
    /// then the product; both gradients computed).
    fn matmul_t(t: &mut Tape, s: &Step, x: Id, w: Id, (out, inp): (usize, usize)) -> Id {
        let wt = t.view(Kind::Pass, w, (out * inp * s.elem) as u64);
        t.op(
            Kind::Matmul {
                lhs_grad: s.act(inp),
                rhs_grad: (out * inp * s.elem) as u64,
            },
            &[x, wt],
            s.act(out),
        )
    }

    /// `y + scale · (drop(x) · Aᵀ) · Bᵀ`, [`crate::lora::Adapter::forward`]'s composition; with
    /// DoRA [`crate::lora::LoraLinear`]'s `g ⊙ (y + s·B·A x)`, or with dropout
    /// `y + (g − 1) ⊙ base(drop(x)) + g ⊙ s·B·A·drop(x)` (`base` is the base product on another
    /// input).
    fn adapter(
        t: &mut Tape,
        s: &Step,
        x: Id,
        y: Id,
        (out, inp, r): (usize, usize, usize),
        base: impl Fn(&mut Tape, Id) -> Id,
    ) -> Id {
        let f32b = |n: usize| (n * 4) as u64;
        let x = if s.dropout {
            t.unary(x, s.act(inp), s.act(inp))
        } else {
            x
        };
        // DoRA with dropout: the factor first (as the forward computes it), then `(g − 1) ⊙
        // base(drop(x))` beside `y`.
        let (g, y) = match (s.dora, s.dropout) {
            (true, true) => {
                let g = dora_factor(t, s, out);
                let g1 = t.op(Kind::Affine, &[g], (out * s.elem) as u64);
                let yd = base(t, x);
                let e = row_scaled(t, s, yd, g1, out);
                (Some(g), t.op(Kind::Add, &[y, e], s.act(out)))
            }
            (true, false) => (Some(dora_factor(t, s, out)), y),
            _ => (None, y),
        };
        let a = t.var(f32b(r * inp));
        let b = t.var(f32b(out * r));
        // A and B·scale in the compute dtype (a conversion only when it is not f32).
        let cast = |t: &mut Tape, v: Id, n: usize| {
            if s.elem == 4 {
                v
            } else {
                t.op(Kind::Affine, &[v], (n * s.elem) as u64)
            }
        };
        let a = cast(t, a, r * inp);
        let bs = t.op(Kind::Affine, &[b], f32b(out * r));
        let bs = cast(t, bs, out * r);
        let h = matmul_t(t, s, x, a, (r, inp));
        let p = matmul_t(t, s, h, bs, (out, r));
        match (g, s.dropout) {
            (None, _) => t.op(Kind::Add, &[y, p], s.act(out)),
            (Some(g), true) => {
                let f = row_scaled(t, s, p, g, out);
                t.op(Kind::Add, &[y, f], s.act(out))
            }
            (Some(g), false) => {
                let sum = t.op(Kind::Add, &[y, p], s.act(out));
                row_scaled(t, s, sum, g, out)
            }
        }
    }

    /// A fused projection, or its split parts concatenated.
    fn projection(t: &mut Tape, s: &Step, cfg: &Phi3Config, x: Id, fused: &'static str) -> Id {
        let shape = |target: &str| {
            let [o, i] = cfg.any_linear_shape(target).expect("a linear of the model");
            (o, i)
        };
        match cfg.layout() {
            Layout::Fused => linear(t, s, x, fused, shape(fused)),
            Layout::Split => {
                let parts: Vec<Id> = super::super::names::split_parts(fused)
                    .iter()
                    .map(|&p| linear(t, s, x, p, shape(p)))
                    .collect();
                let bytes = parts.iter().map(|&p| t.bytes(p)).sum();
                t.op(Kind::Cat, &parts, bytes)
            }
        }
    }

    /// What one block costs to recompute, for `qlora plan`'s choice of checkpointing policies.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Work {
        /// FLOPs of the block's forward (its linears with their adapters, and the attention's two
        /// products over the causal half of the scores).
        pub forward_flops: f64,
        /// FLOPs a selective recomputation skips: the attention's products (on the fused path)
        /// and the gate/up parts whose op takes its output back.
        pub selective_skips: f64,
        /// Bytes [`super::Kept`] holds beyond the block input: the attention's output and each
        /// replayed gate/up part's.
        pub selective_bytes: u64,
        /// Of those, the gate/up outputs a replayed op holds in the recomputed graph (the blocked
        /// attention holds its output in any graph, so the attention's is there already).
        pub selective_held: u64,
    }

    /// [`Work`] of one block of `cfg` on `s`, as [`super::OpPath::for_device`]'s path runs it
    /// (fused: the attention replays; a gate/up part replays where it is an NF4 linear with a
    /// plain adapter, in f32 on the CPU: [`crate::lora::LoraLinear::replayable`]).
    pub fn work(s: &Step, cfg: &Phi3Config) -> Work {
        let m = s.rows() as f64;
        let shape = |target: &str| {
            let [o, i] = cfg.any_linear_shape(target).expect("a linear of the model");
            (o, i)
        };
        let parts = |fused: &'static str| -> Vec<&'static str> {
            match cfg.layout() {
                Layout::Fused => vec![fused],
                Layout::Split => super::super::names::split_parts(fused).to_vec(),
            }
        };
        let flops = |target: &str| {
            let (o, i) = shape(target);
            let lora = s.rank(target).map_or(0, |r| r * (i + o));
            2.0 * m * (o * i + lora) as f64
        };
        let linears: f64 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
            .into_iter()
            .flat_map(parts)
            .map(flops)
            .sum();
        let (b, t) = (s.batch as f64, s.seq as f64);
        let heads = (cfg.num_attention_heads * cfg.head_dim()) as f64;
        // q·kᵀ and p·v, 2 FLOPs a product term, over half of the [T, T] scores.
        let attention = 2.0 * b * heads * t * t;
        let cpu_f32 = s.cpu_threads.is_some() && s.elem == 4;
        let replayed: Vec<&str> = parts("gate_up_proj")
            .into_iter()
            .filter(|p| s.nf4 && !s.dora && cpu_f32 && shape(p).1 % 2 == 0 && s.rank(p).is_some())
            .collect();
        let held: u64 = replayed.iter().map(|p| s.act(shape(p).0)).sum();
        Work {
            forward_flops: linears + attention,
            selective_skips: attention + replayed.iter().map(|p| flops(p)).sum::<f64>(),
            selective_bytes: s.act(cfg.num_attention_heads * cfg.head_dim()) + held,
            selective_held: held,
        }
    }

    /// The block on `x` (`[batch, seq, hidden]`), its output's id.
    pub fn block(t: &mut Tape, s: &Step, cfg: &Phi3Config, x: Id) -> Id {
        let (hid, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        let inter = cfg.intermediate_size;
        let norm = |t: &mut Tape, x: Id| t.unary(x, s.act(hid), s.act(hid));
        let n1 = norm(t, x);
        let qkv = projection(t, s, cfg, n1, "qkv_proj");
        let full = s.act((nh + 2 * nkv) * d);
        // heads(): narrow (a view), reshape of the strided view (a copy), transpose (a view),
        // contiguous (a copy); q and k then through RoPE.
        let heads = |t: &mut Tape, n: usize, rope: bool| {
            let bytes = s.act(n * d);
            let nar = t.view(Kind::Narrow { full }, qkv, bytes);
            let rs = t.op(Kind::Pass, &[nar], bytes);
            let tr = t.view(Kind::Pass, rs, bytes);
            let c = t.op(Kind::Pass, &[tr], bytes);
            if rope { t.unary(c, bytes, bytes) } else { c }
        };
        let q = heads(t, nh, true);
        let k = heads(t, nkv, true);
        let v = heads(t, nkv, false);
        let (u, kv) = (s.act(nh * d), s.act(nkv * d));
        let am = match s.cpu_threads {
            Some(n) => qlora_quant::fused::Blocking::for_device(&candle_core::Device::Cpu, true)
                .memory((s.batch, nh, nkv, s.seq, s.seq, d), s.elem, true, n),
            None => qlora_quant::fused::Blocking::new(true).memory(
                (s.batch, nh, nkv, s.seq, s.seq, d),
                s.elem,
                false,
                1,
            ),
        };
        // The blocked attention op keeps its output (and on the CPU in f32 its row statistics) for
        // the backward besides handing out a copy.
        let att = t.op_holding(
            Kind::Custom {
                grads: vec![Some(u), Some(kv), Some(kv)],
                bwd_transient: am.backward,
                fwd_transient: am.forward,
            },
            &[q, k, v],
            u,
            u + am.held,
        );
        let tr = t.view(Kind::Pass, att, u);
        let merged = t.op(Kind::Pass, &[tr], u);
        let o = linear(t, s, merged, "o_proj", (hid, nh * d));
        let x1 = t.op(Kind::Add, &[x, o], s.act(hid));
        let n2 = norm(t, x1);
        let gu = projection(t, s, cfg, n2, "gate_up_proj");
        let sw = t.unary(gu, s.act(inter), s.act(2 * inter));
        let down = linear(t, s, sw, "down_proj", (hid, inter));
        t.op(Kind::Add, &[x1, down], s.act(hid))
    }
}
