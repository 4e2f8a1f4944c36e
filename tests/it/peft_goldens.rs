//! What the PEFT-golden tests (dora, modules, tokens, embed_lora, head_lora) share: loading a
//! generator's goldens, the batch of its `input_ids` (every position a target), checking our
//! gradients against PEFT's by name, and reading an adapter file's tensors for a byte comparison.

use crate::common::{fixtures, max_abs};
use crate::model::max_abs_diff;
use candle_core::{DType, Device, Tensor};
use qlora::train::{Batch, LossAndGrads};
use std::collections::HashMap;

/// `tests/fixtures/<dir>/goldens.safetensors`.
pub fn goldens(dir: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(dir).join("goldens.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// The goldens' `input_ids` as a causal batch with every next token a target (the generators sum
/// the cross-entropy over `logits[:, :-1]` against `ids[:, 1:]`).
pub fn batch(g: &HashMap<String, Tensor>) -> Batch {
    let rows: Vec<Vec<u32>> = g["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let labels: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| r.iter().map(|&t| t as i64).collect())
        .collect();
    Batch::causal(&rows, &labels, &Device::Cpu).unwrap()
}

/// The golden scalar `key` as f64.
pub fn scalar(g: &HashMap<String, Tensor>, key: &str) -> f64 {
    g[key]
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `lg`'s loss within 1e-5 of the golden `loss_key`, and each gradient within 1e-4 of its golden's
/// largest entry, `keys` naming the goldens in the order of the gradients.
pub fn assert_matches(
    lg: &LossAndGrads,
    g: &HashMap<String, Tensor>,
    loss_key: &str,
    keys: &[String],
    what: &str,
) {
    let want = scalar(g, loss_key);
    assert!(
        (lg.loss_sum - want).abs() <= 1e-5 * want,
        "{what}: loss {} vs PEFT {want}",
        lg.loss_sum
    );
    assert_eq!(lg.grads.len(), keys.len(), "{what}: gradient count");
    for (got, key) in lg.grads.iter().zip(keys) {
        let want = &g[key];
        let d = max_abs_diff(got, want);
        assert!(
            d <= 1e-4 * max_abs(want),
            "{what}: {key} |Δ| {d:e} of {:e}",
            max_abs(want)
        );
    }
}

/// The golden keys `<prefix>.<module>.lora_A` / `lora_B` of each block adapter of `m`, in the
/// order of its gradients.
pub fn adapter_keys(m: &qlora::model::Phi3, prefix: &str) -> Vec<String> {
    m.adapters()
        .iter()
        .flat_map(|a| {
            [
                format!("{prefix}.{}.lora_A", a.module),
                format!("{prefix}.{}.lora_B", a.module),
            ]
        })
        .collect()
}

/// One tensor of an adapter file: name, shape, dtype, bytes.
pub type Entry = (String, Vec<usize>, safetensors::Dtype, Vec<u8>);

/// The tensors of `dir`'s adapter file, sorted by name, without PEFT's copies of the base's own
/// weights beside an embedding or head LoRA (`….base_layer.weight`, which qlora does not write).
pub fn adapter_entries(dir: &std::path::Path) -> Vec<Entry> {
    let bytes = std::fs::read(dir.join(qlora::lora::peft::WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<Entry> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".base_layer.weight"))
        .map(|(k, t)| (k, t.shape().to_vec(), t.dtype(), t.data().to_vec()))
        .collect();
    v.sort_by(|x, y| x.0.cmp(&y.0));
    v
}

/// Our saved adapter in `ours` holds PEFT's tensors in `peft`: the same names, shapes and dtypes
/// (listed on failure), and the same bytes.
pub fn assert_same_tensors(ours: &std::path::Path, peft: &std::path::Path) {
    let (a, b) = (adapter_entries(ours), adapter_entries(peft));
    let names = |v: &[Entry]| {
        v.iter()
            .map(|(k, s, d, _)| format!("{k} {s:?} {d:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), names(&b));
    assert!(a == b, "the same tensors, with other bytes");
}
