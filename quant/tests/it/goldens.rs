//! Bit-for-bit comparison with bitsandbytes 0.50.2 (tests/fixtures/gen_bnb_goldens.py).

use crate::fixtures;
use half::bf16;
use qlora_quant::bnb;
use qlora_quant::cpu;
use qlora_quant::format::dynamic_map;
use qlora_quant::{Absmax, Blocksize, QuantType, Quantized};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

/// bitsandbytes' native CPU 8-bit kernel (`quantize_cpu`: approximate binary search, then a distance
/// check) can pick the neighbouring code for a value within this distance (in units of the
/// normalised value `(absmax − offset) / nested_absmax`) of the midpoint between two map entries.
/// Measured on the goldens: the largest such distance is printed by the test; 1.5e-5 bounds it.
const BNB_DQ_MIDPOINT_BAND: f32 = 1.5e-5;
/// And it happens rarely: at most this fraction of distinct absmax values may get another code.
const BNB_DQ_MAX_FLIP_FRACTION: f64 = 0.01;

#[derive(Deserialize)]
struct Case {
    case: String,
    input: String,
    quant_type: String,
    blocksize: usize,
    double_quant: bool,
    shape: Vec<usize>,
    dtype: String,
    dequant_dtype: String,
}

#[derive(Deserialize)]
struct Index {
    cases: Vec<Case>,
}

fn load() -> (Vec<u8>, Index) {
    let dir = fixtures().join("bnb");
    let bytes = std::fs::read(dir.join("quant_cases.safetensors")).expect("golden safetensors");
    let index =
        serde_json::from_slice(&std::fs::read(dir.join("quant_cases.json")).unwrap()).unwrap();
    (bytes, index)
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("golden tensor {name}"));
    match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => bf16s(st, name).iter().map(|v| v.to_f32()).collect(),
        other => panic!("{name}: {other:?}"),
    }
}

fn bf16s(st: &SafeTensors<'_>, name: &str) -> Vec<bf16> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::BF16);
    t.data()
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn u8s(st: &SafeTensors<'_>, name: &str) -> Vec<u8> {
    st.tensor(name).unwrap().data().to_vec()
}

fn assert_bits_eq(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_bits_eq_with(what, ours, theirs, |a, b| a.to_bits() == b.to_bits());
}

/// Bitwise, except that +0.0 and -0.0 agree: bitsandbytes' own FP4 dequantizers disagree on the sign
/// of code 0b1000's zero (native CPU and CUDA kernels: -0.0; the Python fallback that it uses for an
/// odd last dimension: +0.0).
fn assert_bits_eq_signless_zero(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_bits_eq_with(what, ours, theirs, |a, b| {
        a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0)
    });
}

fn assert_bits_eq_with(what: &str, ours: &[f32], theirs: &[f32], same: impl Fn(f32, f32) -> bool) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let bad: Vec<usize> = (0..ours.len())
        .filter(|&i| !same(ours[i], theirs[i]))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ; first at {:?}: ours {:?} bnb {:?}",
        bad.len(),
        ours.len(),
        &bad[..bad.len().min(5)],
        bad.iter().take(5).map(|&i| ours[i]).collect::<Vec<_>>(),
        bad.iter().take(5).map(|&i| theirs[i]).collect::<Vec<_>>()
    );
}

/// Compares our 8-bit absmax codes with bitsandbytes': every difference must be a neighbouring code
/// for a value inside [`BNB_DQ_MIDPOINT_BAND`] of their midpoint, and differences must be rare.
/// Returns the largest distance seen.
fn check_absmax_codes(
    what: &str,
    ours: &qlora_quant::NestedAbsmax,
    absmax: &[f32],
    theirs: &[u8],
) -> f32 {
    let map = dynamic_map();
    let mut worst = 0f32;
    let mut flipped = Vec::new();
    for (b, (&o, &t)) in ours.codes.iter().zip(theirs).enumerate() {
        if o == t {
            continue;
        }
        flipped.push(absmax[b].to_bits());
        assert_eq!(
            o.abs_diff(t),
            1,
            "{what}: absmax code {b}: ours {o}, bitsandbytes {t}"
        );
        let v = (absmax[b] - ours.offset) / ours.nested_absmax[b / 256];
        let dist = (v - (map[o as usize] + map[t as usize]) / 2.0).abs();
        eprintln!("{what}: block {b}: ours {o}, bitsandbytes {t}, {dist:e} from the midpoint");
        assert!(
            dist <= BNB_DQ_MIDPOINT_BAND,
            "{what}: block {b} differs {dist:e} from the midpoint"
        );
        worst = worst.max(dist);
    }
    // bf16 weights repeat absmax values, and a value on the edge flips in every block holding it:
    // count distinct values.
    flipped.sort_unstable();
    flipped.dedup();
    let frac = flipped.len() as f64 / theirs.len() as f64;
    assert!(
        frac <= BNB_DQ_MAX_FLIP_FRACTION,
        "{what}: {} of {} absmax values flip",
        flipped.len(),
        theirs.len()
    );
    worst
}

#[test]
fn dynamic_map_regenerates_bitsandbytes_create_dynamic_map() {
    let (bytes, _) = load();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_bits_eq("dynamic map", dynamic_map(), &f32s(&st, "dynamic_map"));
}

#[test]
fn quantize_and_dequantize_match_bitsandbytes() {
    let (bytes, index) = load();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut worst_band = 0f32;
    for c in &index.cases {
        let qt: QuantType = c.quant_type.parse().unwrap();
        let bs = Blocksize::new(c.blocksize).unwrap();
        let dtype = match c.dtype.as_str() {
            "float32" => candle_core::DType::F32,
            "bfloat16" => candle_core::DType::BF16,
            other => panic!("{other}"),
        };
        let x = f32s(&st, &c.input);
        let n = x.len();
        let ours = Quantized::quantize(&x, &c.shape, dtype, qt, bs, c.double_quant).unwrap();
        let name = |s: &str| format!("{}.{s}", c.case);

        // Codes (packed, nibble order and padding included) and the code table.
        assert_eq!(
            ours.packed,
            u8s(&st, &name("packed")),
            "{}: packed codes",
            c.case
        );
        assert_bits_eq(
            &name("quant_map"),
            &qt.stored_quant_map(),
            &f32s(&st, &name("quant_map")),
        );
        // The fast path and the reference agree on these inputs too.
        let reference = cpu::quantize_ref(&x, qt, bs).unwrap();
        assert_eq!(reference.packed, ours.packed, "{}: ref vs fast", c.case);

        // Absmax, plain or double-quantized.
        let theirs_absmax = if c.double_quant {
            let Absmax::Nested(nested) = &ours.absmax else {
                panic!("nested expected")
            };
            assert_bits_eq(
                &name("offset"),
                &[nested.offset],
                &f32s(&st, &name("offset")),
            );
            assert_bits_eq(
                &name("nested_absmax"),
                &nested.nested_absmax,
                &f32s(&st, &name("nested_absmax")),
            );
            assert_bits_eq(
                &name("nested_map"),
                dynamic_map(),
                &f32s(&st, &name("nested_map")),
            );
            let codes = u8s(&st, &name("absmax_codes"));
            worst_band = worst_band.max(check_absmax_codes(
                &c.case,
                nested,
                &reference.absmax,
                &codes,
            ));
            // Our decoding of bitsandbytes' nested state equals bitsandbytes' decoding.
            let nested_theirs = qlora_quant::NestedAbsmax {
                codes,
                nested_absmax: f32s(&st, &name("nested_absmax")),
                offset: f32s(&st, &name("offset"))[0],
            };
            let decoded = nested_theirs.decode();
            assert_bits_eq(
                &name("absmax_decoded"),
                &decoded,
                &f32s(&st, &name("absmax_decoded")),
            );
            decoded
        } else {
            let theirs = f32s(&st, &name("absmax"));
            let Absmax::Plain(a) = &ours.absmax else {
                panic!("plain expected")
            };
            assert_bits_eq(&name("absmax"), a, &theirs);
            theirs
        };

        // Dequantization of bitsandbytes' state, bit for bit, in bitsandbytes' output dtype.
        let packed = u8s(&st, &name("packed"));
        match c.dequant_dtype.as_str() {
            "float32" => {
                let dq: Vec<f32> = cpu::dequantize(&packed, &theirs_absmax, qt, bs, n).unwrap();
                assert_bits_eq_signless_zero(&name("dequant"), &dq, &f32s(&st, &name("dequant")));
                let r: Vec<f32> = cpu::dequantize_ref(&packed, &theirs_absmax, qt, bs, n);
                assert_bits_eq(&name("dequant ref"), &r, &dq);
            }
            "bfloat16" => {
                let dq: Vec<bf16> = cpu::dequantize(&packed, &theirs_absmax, qt, bs, n).unwrap();
                let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                assert_bits_eq_signless_zero(
                    &name("dequant"),
                    &widen(&dq),
                    &widen(&bf16s(&st, &name("dequant"))),
                );
            }
            other => panic!("{other}"),
        }
    }
    eprintln!(
        "largest distance of a bitsandbytes absmax-code flip from its midpoint: {worst_band:e}"
    );
}

#[test]
fn transformers_saved_checkpoint_loads_and_matches_our_quantization() {
    let dir = fixtures().join("bnb");
    let dense_bytes = std::fs::read(dir.join("tiny-phi3/model.safetensors")).unwrap();
    let dense = SafeTensors::deserialize(&dense_bytes).unwrap();
    let q_bytes = std::fs::read(dir.join("tiny-phi3-bnb/model.safetensors")).unwrap();
    let qst = SafeTensors::deserialize(&q_bytes).unwrap();
    let mut n_weights = 0;
    for name in qst.names() {
        let is_weight = name.ends_with("_proj.weight");
        if !is_weight {
            continue;
        }
        n_weights += 1;
        let theirs = bnb::from_tensors(name, |n| qst.tensor(n).ok()).unwrap();
        let w = dense.tensor(name).unwrap();
        let x: Vec<f32> = w
            .data()
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let ours = Quantized::quantize(
            &x,
            w.shape(),
            candle_core::DType::BF16,
            QuantType::Nf4,
            Blocksize::DEFAULT,
            true,
        )
        .unwrap();
        assert_eq!(ours.shape, theirs.shape, "{name}");
        assert_eq!(ours.packed, theirs.packed, "{name}: codes");
        let (Absmax::Nested(a), Absmax::Nested(b)) = (&ours.absmax, &theirs.absmax) else {
            panic!("{name}: nested")
        };
        assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "{name}: offset");
        assert_eq!(a.nested_absmax, b.nested_absmax, "{name}: nested absmax");
        let plain = qlora_quant::cpu::quantize_ref(&x, QuantType::Nf4, Blocksize::DEFAULT)
            .unwrap()
            .absmax;
        check_absmax_codes(name, a, &plain, &b.codes);

        // And what we write reads back as the same weight.
        let written = bnb::to_tensors(name, &theirs, bnb::QuantStorage::Uint8).unwrap();
        let st_bytes = safetensors::serialize(written, None).unwrap();
        let back = SafeTensors::deserialize(&st_bytes).unwrap();
        assert_eq!(
            bnb::from_tensors(name, |n| back.tensor(n).ok()).unwrap(),
            theirs,
            "{name}: round trip"
        );
        // transformers' packed quant-state JSON is byte-identical to ours.
        let state = format!("{name}.quant_state.bitsandbytes__nf4");
        let ours_json = serde_json::to_string(
            &serde_json::from_slice::<serde_json::Value>(back.tensor(&state).unwrap().data())
                .unwrap(),
        )
        .unwrap();
        let theirs_json = serde_json::to_string(
            &serde_json::from_slice::<serde_json::Value>(qst.tensor(&state).unwrap().data())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ours_json, theirs_json, "{state}");
    }
    assert_eq!(n_weights, 2 * 4, "four quantized linears per layer");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tiny-phi3-bnb/config.json")).unwrap())
            .unwrap();
    let qc: bnb::QuantizationConfig =
        serde_json::from_value(cfg["quantization_config"].clone()).unwrap();
    assert!(qc.is_bnb_4bit());
    assert_eq!(
        qc,
        bnb::QuantizationConfig::new_4bit(QuantType::Nf4, true, candle_core::DType::BF16)
    );
}

#[test]
fn reinterpreted_storage_dtypes_carry_the_same_bytes() {
    let x: Vec<f32> = (0..256)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let q = Quantized::quantize(
        &x,
        &[4, 64],
        candle_core::DType::F32,
        QuantType::Nf4,
        Blocksize::DEFAULT,
        false,
    )
    .unwrap();
    for storage in [
        bnb::QuantStorage::Bfloat16,
        bnb::QuantStorage::Float32,
        bnb::QuantStorage::Float16,
    ] {
        let t = bnb::to_tensors("w.weight", &q, storage).unwrap();
        assert_ne!(t[0].1.dtype, Dtype::U8);
        let bytes = safetensors::serialize(t, None).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            bnb::from_tensors("w.weight", |n| st.tensor(n).ok()).unwrap(),
            q
        );
    }
}
