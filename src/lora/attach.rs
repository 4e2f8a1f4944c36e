//! Putting adapters on a model: fresh ones for training, or ones read from a PEFT adapter, and
//! reading them back out for saving or merging.

use super::peft::{ModuleWeights, PeftAdapter};
use super::{Adapter, Dora, LoraConfig};
use crate::model::Phi3;
use crate::model::names::LAYER_PREFIX;
use anyhow::{Context, Result, bail, ensure};
use candle_core::Var;
use rand::SeedableRng;

/// `model.layers.{layer}.{self_attn|mlp}.{target}`.
pub fn module_path(layer: usize, target: &str) -> String {
    let group = if matches!(
        target,
        "qkv_proj" | "o_proj" | "q_proj" | "k_proj" | "v_proj"
    ) {
        "self_attn"
    } else {
        "mlp"
    };
    format!("{LAYER_PREFIX}{layer}.{group}.{target}")
}

/// Fresh adapters (A kaiming-uniform from `seed`, B = 0; with DoRA the magnitude at the base's
/// row norms) on every targeted linear.
pub fn init_adapters(model: &mut Phi3, cfg: &LoraConfig, seed: u64) -> Result<()> {
    let targets = cfg.target_names(model.cfg.layout())?;
    model.saved.embed_lora = None;
    model.saved.head_lora = None;
    let per_layer = model.cfg.layout().linears().len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let device = model.device.clone();
    let model_dtype = model.dtype;
    for (layer, blk) in model.layers.iter_mut().enumerate() {
        for (t, (name, lin)) in blk.linears_mut().into_iter().enumerate() {
            lin.adapter = None;
            if targets.contains(&name) {
                let (out, inp) = lin.base.dims()?;
                let stream = (layer * per_layer + t) as u64 + 1;
                let master = super::master_dtype(model_dtype);
                let mut adapter = Adapter::new(
                    module_path(layer, name),
                    out,
                    inp,
                    cfg,
                    &mut rng,
                    stream,
                    master,
                    &device,
                )?;
                if cfg.use_dora {
                    adapter.dora = Some(Dora::fresh(&lin.base, master)?);
                }
                lin.adapter = Some(adapter);
            }
        }
    }
    if cfg.head_targeted() {
        ensure!(
            !model.cfg.tie_word_embeddings,
            "lora target lm_head: this model ties its head to its embedding \
             (tie_word_embeddings); LoRA on such a head is not built"
        );
        let master = super::master_dtype(model.dtype);
        model.saved.head_lora = Some(Adapter::new(
            "lm_head".into(),
            model.cfg.vocab_size,
            model.cfg.hidden_size,
            cfg,
            &mut rng,
            head_stream(model),
            master,
            &device,
        )?);
    }
    if cfg.embedding_targeted() {
        // After the block linears' draws, so that adding the embedding leaves them as they were.
        let master = super::master_dtype(model.dtype);
        model.saved.embed_lora = Some(super::EmbedLora::new(
            model.cfg.vocab_size,
            model.cfg.hidden_size,
            cfg,
            &mut rng,
            master,
            &device,
        )?);
    }
    Ok(())
}

/// The head LoRA's dropout stream: after every block linear's.
pub fn head_stream(model: &Phi3) -> u64 {
    (model.layers.len() * model.cfg.layout().linears().len()) as u64 + 1
}

/// The head's LoRA as `(A, B)`, for saving.
pub fn head_lora_weights(model: &Phi3) -> Option<(candle_core::Tensor, candle_core::Tensor)> {
    model
        .saved
        .head_lora
        .as_ref()
        .map(|h| (h.a.as_tensor().clone(), h.b.as_tensor().clone()))
}

/// The embedding's LoRA as `(A, B)`, for saving.
pub fn embed_lora_weights(model: &Phi3) -> Option<(candle_core::Tensor, candle_core::Tensor)> {
    model
        .saved
        .embed_lora
        .as_ref()
        .map(|e| (e.a.as_tensor().clone(), e.b.as_tensor().clone()))
}

/// Fresh `lora.modules_to_save` copies of the base's embedding and head, in master precision (as
/// PEFT's ModulesToSaveWrapper deep-copies the module). A model with tied embeddings is refused:
/// its one matrix is both, and PEFT's handling of such ties is not reproduced here.
pub fn init_modules(model: &mut Phi3, cfg: &LoraConfig) -> Result<()> {
    model.saved.embed = None;
    model.saved.head = None;
    if cfg.modules_to_save.is_empty() {
        return Ok(());
    }
    ensure!(
        !model.cfg.tie_word_embeddings,
        "lora.modules_to_save {:?}: this model ties its embedding and head \
         (tie_word_embeddings), which one trainable copy cannot keep apart; train LoRA on the \
         block linears instead",
        cfg.modules_to_save
    );
    let master = super::master_dtype(model.dtype);
    for m in &cfg.modules_to_save {
        let base = if m == "embed_tokens" {
            &model.embed_tokens
        } else {
            &model.lm_head
        };
        let copy = Some(Var::from_tensor(&base.to_dtype(master)?)?);
        if m == "embed_tokens" {
            model.saved.embed = copy;
        } else {
            model.saved.head = copy;
        }
    }
    Ok(())
}

/// The trained embedding rows of `lora.trainable_token_indices`, starting as the base's rows (as
/// PEFT's TrainableTokensLayer initializes them), in master precision. Ids past the vocabulary,
/// and a model that ties its head to its embedding, are refused.
pub fn init_tokens(model: &mut Phi3, cfg: &LoraConfig) -> Result<()> {
    model.saved.tokens = None;
    let rows = cfg.trainable_token_indices.embedding_rows()?;
    if rows.is_empty() {
        return Ok(());
    }
    let v = model.cfg.vocab_size;
    if let Some(bad) = rows.iter().find(|&&r| r as usize >= v) {
        bail!(
            "lora.trainable_token_indices: token {bad} is past the embedding's {v} rows \
             (ids 0..={})",
            v - 1
        );
    }
    ensure!(
        !model.cfg.tie_word_embeddings,
        "lora.trainable_token_indices: this model ties its head to its embedding \
         (tie_word_embeddings), whose trained rows would have to change the head too, which is \
         not done here"
    );
    let idx = candle_core::Tensor::from_slice(&rows, rows.len(), &model.device)?;
    let master = super::master_dtype(model.dtype);
    let delta = model.embed_tokens.index_select(&idx, 0)?.to_dtype(master)?;
    model.saved.tokens = Some(crate::model::phi3::TrainableTokens {
        indices: rows,
        delta: Var::from_tensor(&delta)?,
    });
    Ok(())
}

/// The trained embedding rows as `(ids, [n, H])`, for saving.
pub fn token_rows(model: &Phi3) -> Option<(Vec<u32>, candle_core::Tensor)> {
    model
        .saved
        .tokens
        .as_ref()
        .map(|t| (t.indices.clone(), t.delta.as_tensor().clone()))
}

/// The `modules_to_save` copies as `(module path, [V, H])`, for saving.
pub fn module_weights(model: &Phi3) -> Vec<(String, candle_core::Tensor)> {
    let mut out = Vec::new();
    if let Some(v) = &model.saved.embed {
        out.push(("model.embed_tokens".to_string(), v.as_tensor().clone()));
    }
    if let Some(v) = &model.saved.head {
        out.push(("lm_head".to_string(), v.as_tensor().clone()));
    }
    out
}

/// Adapters read from a PEFT adapter; every module in the file must exist in the model with matching
/// shapes (after [`super::convert::to_layout`] when the adapter was made for the other layout).
/// Its `modules_to_save` copies replace the model's embedding and head in the forward.
pub fn load_adapters(model: &mut Phi3, peft: &PeftAdapter) -> Result<()> {
    // An adapter trained on the other layout of the same model is converted, exactly.
    let converted = super::convert::to_layout(peft, &model.cfg, model.cfg.layout())?;
    let peft = &converted;
    let scale = peft.config.scale();
    let mut used = 0;
    let device = model.device.clone();
    let master = super::master_dtype(model.dtype);
    let per_layer = model.cfg.layout().linears().len();
    for (layer, blk) in model.layers.iter_mut().enumerate() {
        for (t, (name, lin)) in blk.linears_mut().into_iter().enumerate() {
            let module = module_path(layer, name);
            lin.adapter = None;
            if let Some(ModuleWeights { a, b, magnitude }) = peft.weights.get(&module) {
                let (out, inp) = lin.base.dims()?;
                ensure!(
                    a.dims() == [peft.config.r, inp] && b.dims() == [out, peft.config.r],
                    "adapter `{module}`: A {:?} / B {:?} do not fit the base [{out}, {inp}] at r = {}",
                    a.dims(),
                    b.dims(),
                    peft.config.r
                );
                let dora = match magnitude {
                    Some(m) => Some(
                        Dora::with_magnitude(&lin.base, m, master)
                            .with_context(|| format!("adapter `{module}`"))?,
                    ),
                    None => None,
                };
                lin.adapter = Some(Adapter {
                    module,
                    a: Var::from_tensor(&a.to_device(&device)?.to_dtype(master)?)?,
                    b: Var::from_tensor(&b.to_device(&device)?.to_dtype(master)?)?,
                    scale,
                    dropout: peft.config.dropout,
                    dropout_stream: (layer * per_layer + t) as u64 + 1,
                    dora,
                });
                used += 1;
            }
        }
    }
    model.saved.head_lora = None;
    if let Some((a, b)) = &peft.head_lora {
        let (v, h) = (model.cfg.vocab_size, model.cfg.hidden_size);
        ensure!(
            a.dims() == [peft.config.r, h] && b.dims() == [v, peft.config.r],
            "the adapter's lm_head LoRA is A {:?}, B {:?}: not [r, {h}] and [{v}, r]",
            a.dims(),
            b.dims()
        );
        let stream = head_stream(model);
        model.saved.head_lora = Some(Adapter {
            module: "lm_head".into(),
            a: Var::from_tensor(&a.to_device(&device)?.to_dtype(master)?)?,
            b: Var::from_tensor(&b.to_device(&device)?.to_dtype(master)?)?,
            scale,
            dropout: peft.config.dropout,
            dropout_stream: stream,
            dora: None,
        });
    }
    model.saved.embed_lora = None;
    if let Some((a, b)) = &peft.embed_lora {
        let (v, h) = (model.cfg.vocab_size, model.cfg.hidden_size);
        ensure!(
            a.dims() == [peft.config.r, v] && b.dims() == [h, peft.config.r],
            "the adapter's embedding LoRA is A {:?}, B {:?}: not [r, {v}] and [{h}, r] (an adapter \
             for another model?)",
            a.dims(),
            b.dims()
        );
        model.saved.embed_lora = Some(super::EmbedLora {
            a: Var::from_tensor(&a.to_device(&device)?.to_dtype(master)?)?,
            b: Var::from_tensor(&b.to_device(&device)?.to_dtype(master)?)?,
            scale,
        });
    }
    init_modules(model, &peft.config)?;
    init_tokens(model, &peft.config)?;
    if let (Some(tt), Some((ids, rows))) = (&mut model.saved.tokens, &peft.tokens) {
        ensure!(
            &tt.indices == ids && rows.dims() == tt.delta.dims(),
            "the adapter's trained token rows {:?} do not fit {} ids of width {}",
            rows.dims(),
            ids.len(),
            model.cfg.hidden_size
        );
        tt.delta = Var::from_tensor(&rows.to_device(&device)?.to_dtype(master)?)?;
    }
    for (path, t) in &peft.modules {
        let want = if path == "lm_head" {
            &model.lm_head
        } else {
            &model.embed_tokens
        };
        ensure!(
            t.dims() == want.dims(),
            "adapter's `{path}` copy is {:?} but the model's is {:?} (an adapter for another model?)",
            t.dims(),
            want.dims()
        );
        let v = Var::from_tensor(&t.to_device(&device)?.to_dtype(master)?)?;
        if path == "lm_head" {
            model.saved.head = Some(v);
        } else {
            model.saved.embed = Some(v);
        }
    }
    if used != peft.weights.len() {
        let missing: Vec<_> = peft
            .weights
            .keys()
            .filter(|m| !model.adapters().iter().any(|a| &a.module == *m))
            .collect();
        bail!("the adapter has modules this model lacks: {missing:?} (is it for another base?)");
    }
    Ok(())
}

/// The tensors of every adapter, by module, for saving.
pub fn adapter_weights(model: &Phi3) -> Vec<(String, ModuleWeights)> {
    model
        .adapters()
        .into_iter()
        .map(|a| {
            (
                a.module.clone(),
                ModuleWeights {
                    a: a.a.as_tensor().clone(),
                    b: a.b.as_tensor().clone(),
                    magnitude: a.dora.as_ref().map(|d| d.magnitude.as_tensor().clone()),
                },
            )
        })
        .collect()
}
