//! An adapter moved between the two layouts of the same model ([`Layout`]), exactly: the update
//! `scale · B · A` of every weight row stays what it was.
//!
//! - **Fused → split.** `qkv_proj`'s `(A, B)` becomes `q_proj`'s `(A, B[Q rows])`, `k_proj`'s
//!   `(A, B[K rows])`, `v_proj`'s `(A, B[V rows])` (likewise `gate_up_proj`); rank and α unchanged.
//! - **Split → fused.** The parts' `A`s are stacked (rank = the sum of theirs) and their `B`s placed
//!   block-diagonally: each part's rows see only its own `A`, and the rows of an untargeted part
//!   are zero. PEFT (and llama.cpp) give one rank to all modules, so every module is then padded
//!   with zero rows of `A` and zero columns of `B` to the largest rank `R`, and α rescaled so the
//!   scale is unchanged (`α·R/r`, with rsLoRA `α·√(R/r)`). Zero terms add nothing to any product.
//! - **DoRA.** A magnitude belongs to its rows, as `B` does: split with them, and stacked in row
//!   order when every part of a fused module is present. With a part missing the fused module's
//!   rows of that part would need `m = ‖W_j‖` from the base, which an adapter alone lacks: refused.

use super::LoraConfig;
use super::peft::{AdapterWeights, ModuleWeights, PeftAdapter};
use crate::model::Phi3Config;
use crate::model::names::{self, Layout};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// The layout an adapter's module names belong to, or `None` when they fit both (only `o_proj`
/// and `down_proj`, or no modules).
pub fn layout_of(adapter: &PeftAdapter) -> Result<Option<Layout>> {
    let mut found: Option<Layout> = None;
    for module in adapter.weights.keys() {
        let (_, target) = names::block_linear(&format!("{module}.weight"))
            .with_context(|| format!("adapter module `{module}` is not a Phi-3 block linear"))?;
        let this = match (
            Layout::Fused.suffix(target).is_some(),
            Layout::Split.suffix(target).is_some(),
        ) {
            (true, true) => continue,
            (true, false) => Layout::Fused,
            _ => Layout::Split,
        };
        if found.is_some_and(|l| l != this) {
            bail!(
                "the adapter mixes fused (qkv_proj, gate_up_proj) and split (q_proj … up_proj) modules"
            );
        }
        found = Some(this);
    }
    Ok(found)
}

/// `adapter` with its modules named and shaped for a checkpoint of `layout` (`cfg` gives the row
/// ranges of the parts); unchanged when it already is.
pub fn to_layout(adapter: &PeftAdapter, cfg: &Phi3Config, layout: Layout) -> Result<PeftAdapter> {
    match (layout_of(adapter)?, layout) {
        (None, _) => Ok(adapter.clone()),
        (Some(from), to) if from == to => Ok(adapter.clone()),
        (Some(_), Layout::Split) => split(adapter, cfg),
        (Some(_), Layout::Fused) => fuse(adapter, cfg),
    }
}

/// `model.layers.N.<group>.<target>` → layer N's module `to`.
fn renamed(module: &str, to: &str) -> String {
    let (layer, _) = names::block_linear(&format!("{module}.weight")).expect("checked");
    super::attach::module_path(layer, to)
}

fn split(adapter: &PeftAdapter, cfg: &Phi3Config) -> Result<PeftAdapter> {
    let mut weights = AdapterWeights::new();
    for (module, w) in &adapter.weights {
        let (_, target) = names::block_linear(&format!("{module}.weight")).expect("checked");
        for part in names::split_parts(target) {
            let (start, rows) = cfg.rows_in_fused(part).expect("a part of a fused target");
            let magnitude = match &w.magnitude {
                Some(m) => Some(m.narrow(0, start, rows)?.contiguous()?),
                None => None,
            };
            weights.insert(
                renamed(module, part),
                ModuleWeights {
                    a: w.a.clone(),
                    b: w.b.narrow(0, start, rows)?.contiguous()?,
                    magnitude,
                },
            );
        }
    }
    Ok(PeftAdapter {
        config: LoraConfig {
            targets: split_targets(&adapter.config.targets),
            ..adapter.config.clone()
        },
        base_model_name_or_path: adapter.base_model_name_or_path.clone(),
        weights,
        modules: adapter.modules.clone(),
        tokens: adapter.tokens.clone(),
        embed_lora: adapter.embed_lora.clone(),
        head_lora: adapter.head_lora.clone(),
        dir: adapter.dir.clone(),
    })
}

fn split_targets(targets: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for t in targets {
        let parts = names::split_parts(t);
        let expanded: Vec<String> = if parts.is_empty() {
            vec![t.clone()]
        } else {
            parts.iter().map(|p| p.to_string()).collect()
        };
        for p in expanded {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The tensors of each split part present, by target name.
type Parts<'a> = BTreeMap<&'static str, &'a ModuleWeights>;

fn fuse(adapter: &PeftAdapter, cfg: &Phi3Config) -> Result<PeftAdapter> {
    // Group the parts by fused module: `model.layers.N.self_attn.qkv_proj` → {q_proj: (A, B), …}.
    let mut groups: BTreeMap<String, (&'static str, Parts<'_>)> = BTreeMap::new();
    for (module, w) in &adapter.weights {
        let (_, target) = names::block_linear(&format!("{module}.weight")).expect("checked");
        let fused = names::fused_of(target).expect("a split target");
        groups
            .entry(renamed(module, fused))
            .or_insert_with(|| (fused, BTreeMap::new()))
            .1
            .insert(target, w);
    }
    let device = adapter
        .weights
        .values()
        .next()
        .map(|w| w.a.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let zeros = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &device);
    let mut fused_weights: Vec<(String, Tensor, Tensor, Option<Tensor>)> = Vec::new();
    for (module, (fused, parts)) in groups {
        // In row order (Q, K, V; gate, up): A stacked, each part's B in its own columns of its own
        // rows; an untargeted part's rows are zero.
        let present: Vec<(&str, &Tensor, &Tensor)> = names::split_parts(fused)
            .iter()
            .filter_map(|p| parts.get(p).map(|w| (*p, &w.a, &w.b)))
            .collect();
        let magnitude = if adapter.config.use_dora {
            let ms: Vec<Tensor> = names::split_parts(fused)
                .iter()
                .filter_map(|p| parts.get(p).and_then(|w| w.magnitude.clone()))
                .collect();
            if ms.len() != names::split_parts(fused).len() {
                bail!(
                    "`{module}`: this DoRA adapter targets only some of {:?}; fusing it needs every \
                     part's magnitude (the base's row norms are not in the adapter). Load it on a \
                     split-layout checkpoint, or train DoRA on all of them",
                    names::split_parts(fused)
                );
            }
            Some(Tensor::cat(&ms, 0)?)
        } else {
            None
        };
        let rank: usize = present.iter().map(|(_, a, _)| a.dims()[0]).sum();
        let a = Tensor::cat(
            &present
                .iter()
                .map(|(_, a, _)| (*a).clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        let mut rows = Vec::new();
        let mut col = 0;
        for part in names::split_parts(fused) {
            let (_, n) = cfg.rows_in_fused(part).expect("a part");
            rows.push(match present.iter().find(|(p, _, _)| p == part) {
                None => zeros(n, rank)?,
                Some((_, pa, pb)) => {
                    let r = pa.dims()[0];
                    let block = hcat(&[zeros(n, col)?, (*pb).clone(), zeros(n, rank - col - r)?])?;
                    col += r;
                    block
                }
            });
        }
        fused_weights.push((module, a, Tensor::cat(&rows, 0)?, magnitude));
    }
    let r_max = fused_weights
        .iter()
        .map(|(_, a, _, _)| a.dims()[0])
        .max()
        .unwrap_or(adapter.config.r);
    let mut weights = AdapterWeights::new();
    for (module, a, b, magnitude) in fused_weights {
        let (r, inp) = a.dims2()?;
        let out = b.dims()[0];
        let (a, b) = if r < r_max {
            (
                Tensor::cat(&[a, zeros(r_max - r, inp)?], 0)?,
                hcat(&[b, zeros(out, r_max - r)?])?,
            )
        } else {
            (a, b)
        };
        weights.insert(module, ModuleWeights { a, b, magnitude });
    }
    let c = &adapter.config;
    let ratio = r_max as f64 / c.r as f64;
    let alpha = if c.rslora {
        c.alpha * ratio.sqrt()
    } else {
        c.alpha * ratio
    };
    let mut targets: Vec<String> = Vec::new();
    for t in &c.targets {
        let f = if t == "all-linear" {
            t.clone()
        } else {
            names::fused_of(t).unwrap_or(t).to_string()
        };
        if !targets.contains(&f) {
            targets.push(f);
        }
    }
    Ok(PeftAdapter {
        config: LoraConfig {
            r: r_max,
            alpha,
            targets,
            ..c.clone()
        },
        base_model_name_or_path: adapter.base_model_name_or_path.clone(),
        weights,
        modules: adapter.modules.clone(),
        tokens: adapter.tokens.clone(),
        embed_lora: adapter.embed_lora.clone(),
        head_lora: adapter.head_lora.clone(),
        dir: adapter.dir.clone(),
    })
}

/// Columns side by side, empty pieces skipped.
fn hcat(pieces: &[Tensor]) -> Result<Tensor> {
    let kept: Vec<&Tensor> = pieces.iter().filter(|t| t.dims()[1] > 0).collect();
    Ok(Tensor::cat(&kept, 1)?)
}
