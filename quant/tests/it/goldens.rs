//! Bit-for-bit comparison with bitsandbytes 0.50.2 (tests/fixtures/gen_bnb_goldens.py).

use crate::fixtures;
use half::bf16;
use qlora_quant::backend::quantize_blockwise_8bit;
use qlora_quant::bnb;
use qlora_quant::cpu;
use qlora_quant::format::dynamic_map;
use qlora_quant::nested;
use qlora_quant::{Absmax, Blocksize, BnbBackend, QuantType, Quantized};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use sha2::{Digest, Sha256};

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

/// Counts the 8-bit codes where two quantizations of the same absmax differ.
fn code_diffs(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
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
    let (mut cuda_flips, mut n_codes) = (0, 0);
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
        // These goldens come from bitsandbytes' CPU backend: `cpu` mode must give its bytes.
        let cpu = BnbBackend::Cpu;
        let ours =
            Quantized::quantize_as(&x, &c.shape, dtype, qt, bs, c.double_quant, cpu).unwrap();
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
        let reference = cpu::quantize_ref(&x, qt, bs, cpu).unwrap();
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
            assert_eq!(nested.codes, codes, "{}: absmax codes", c.case);
            // The CUDA rounding of the same absmax: counted (the flip table), not asserted.
            let cuda = nested::double_quant(&reference.absmax, BnbBackend::Cuda);
            cuda_flips += code_diffs(&cuda.codes, &codes);
            n_codes += codes.len();
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
    eprintln!("absmax codes that CUDA's rounding would change: {cuda_flips} of {n_codes}");
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
        // transformers quantized these on the CPU.
        let ours = Quantized::quantize_as(
            &x,
            w.shape(),
            candle_core::DType::BF16,
            QuantType::Nf4,
            Blocksize::DEFAULT,
            true,
            BnbBackend::Cpu,
        )
        .unwrap();
        assert_eq!(ours.shape, theirs.shape, "{name}");
        assert_eq!(ours.packed, theirs.packed, "{name}: codes");
        let (Absmax::Nested(a), Absmax::Nested(b)) = (&ours.absmax, &theirs.absmax) else {
            panic!("{name}: nested")
        };
        assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "{name}: offset");
        assert_eq!(a.nested_absmax, b.nested_absmax, "{name}: nested absmax");
        assert_eq!(a.codes, b.codes, "{name}: absmax codes");

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

#[derive(Deserialize)]
struct Blockwise {
    device: String,
    n: usize,
    blocksize: usize,
    input_sha256: String,
    codes_sha256: String,
    absmax_sha256: String,
    sample_stride: usize,
    sample_codes_hex: String,
    quantize_4bit: std::collections::BTreeMap<String, Quant4Golden>,
}

#[derive(Deserialize)]
struct Quant4Golden {
    packed_sha256: String,
    absmax_sha256: String,
    offset_bits: u32,
    absmax_codes_sha256: String,
    nested_absmax_sha256: String,
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The input of tests/fixtures/gen_bnb_blockwise_goldens.py, rebuilt with the same f32 arithmetic
/// (its docstring states the recipe).
fn blockwise_input(n: usize, block: usize) -> Vec<f32> {
    let map = dynamic_map();
    let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let field = |h: u64, shift: u32, mask: u64| ((h >> shift) & mask) as i64;
    let pow2 = |e: i64| 2f32.powi(e as i32);
    let shift_ulps = |v: f32, d: i64| f32::from_bits((v.to_bits() as i32 + d as i32) as u32);
    (0..n)
        .map(|i| {
            let b = i / block;
            let hb = splitmix64((n + b) as u64);
            let s =
                (1.0f32 + field(hb, 40, 0xFFFF) as f32 / 65536.0) * pow2(field(hb, 20, 0xF) - 8);
            let h = splitmix64(i as u64);
            let frac24 = field(h, 8, 0xFF_FFFF) as f32 / 16_777_216.0;
            let sign = if field(h, 1, 1) == 1 { -1.0f32 } else { 1.0 };
            let d = field(h, 16, 0xFFFF) % 7 - 3;
            if b.is_multiple_of(97) {
                return 0.0;
            }
            if i % block == 0 {
                return sign * s;
            }
            match field(h, 60, 0xF) {
                0..=5 => (2.0 * frac24 - 1.0) * s,
                6..=9 => shift_ulps(mids[(field(h, 8, 0xFFFF_FFFF) % 255) as usize], d) * s,
                10..=12 => sign * frac24 * pow2(-(field(h, 32, 0xFFFF) % 24 + 4)) * s,
                13..=14 => {
                    let g = (field(h, 8, 0xFFFF_FFFF) % 65535) as f32;
                    let edge = -1.0f32 + (2.0 * g + 1.0) / 65535.0;
                    let edge = if edge == 0.0 {
                        edge
                    } else {
                        shift_ulps(edge, d)
                    };
                    edge.clamp(-1.0, 1.0) * s
                }
                _ => {
                    if field(h, 2, 1) == 1 {
                        -0.0
                    } else {
                        0.0
                    }
                }
            }
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Checks a golden of tests/fixtures/gen_bnb_blockwise_goldens.py with the backend of the device
/// that made it: the 8-bit blockwise codes (sampled first, to name a differing element), then
/// `quantize_4bit`'s packed codes and absmax, and its double quantization around bitsandbytes'
/// offset. Returns the number of 8-bit codes the other backend's rounding would change.
fn check_blockwise_golden(path: &std::path::Path) -> usize {
    let g: Blockwise = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let (backend, other) = match g.device.as_str() {
        "cpu" => (BnbBackend::Cpu, BnbBackend::Cuda),
        "cuda" => (BnbBackend::Cuda, BnbBackend::Cpu),
        d => panic!("{}: device {d}", path.display()),
    };
    let x = blockwise_input(g.n, g.blocksize);
    assert_eq!(
        sha256_hex(&f32_bytes(&x)),
        g.input_sha256,
        "the input recipe"
    );

    let (codes, absmax) = quantize_blockwise_8bit(&x, g.blocksize, backend);
    let sample: Vec<u8> = codes.iter().step_by(g.sample_stride).copied().collect();
    let want: Vec<u8> = (0..g.sample_codes_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&g.sample_codes_hex[i..i + 2], 16).unwrap())
        .collect();
    let bad: Vec<usize> = (0..want.len()).filter(|&k| sample[k] != want[k]).collect();
    assert!(
        bad.is_empty(),
        "{backend}: {} of {} sampled codes differ; first at element {}: ours {}, bitsandbytes {}",
        bad.len(),
        want.len(),
        bad.first().map_or(0, |k| k * g.sample_stride),
        bad.first().map_or(0, |&k| sample[k]),
        bad.first().map_or(0, |&k| want[k]),
    );
    assert_eq!(
        sha256_hex(&codes),
        g.codes_sha256,
        "{backend}: all {} codes",
        g.n
    );
    assert_eq!(sha256_hex(&f32_bytes(&absmax)), g.absmax_sha256, "absmax");

    for (qt, want) in &g.quantize_4bit {
        let qt: QuantType = qt.parse().unwrap();
        let q = cpu::quantize(&x, qt, Blocksize::DEFAULT, backend).unwrap();
        assert_eq!(
            sha256_hex(&q.packed),
            want.packed_sha256,
            "{backend} {qt}: packed"
        );
        assert_eq!(
            sha256_hex(&f32_bytes(&q.absmax)),
            want.absmax_sha256,
            "{qt}: absmax"
        );
        let offset = f32::from_bits(want.offset_bits);
        if backend == BnbBackend::Cpu {
            assert_eq!(
                nested::torch_mean_f32(&q.absmax).to_bits(),
                want.offset_bits,
                "{qt}: offset"
            );
        }
        let n = nested::double_quant_with_offset(&q.absmax, offset, backend);
        assert_eq!(
            sha256_hex(&n.codes),
            want.absmax_codes_sha256,
            "{backend} {qt}: absmax codes"
        );
        let nested_absmax = f32_bytes(&n.nested_absmax);
        assert_eq!(
            sha256_hex(&nested_absmax),
            want.nested_absmax_sha256,
            "{qt}: nested absmax"
        );
    }
    let (flipped, _) = quantize_blockwise_8bit(&x, g.blocksize, other);
    code_diffs(&flipped, &codes)
}

/// bitsandbytes' CPU 8-bit blockwise quantizer (its lookup table) on 1,024,000 values crowded
/// around the map's midpoints, the table's grid edges and zero, and its 4-bit quantization of the
/// same values: `cpu` mode gives the same bytes.
#[test]
fn blockwise_cpu_matches_bitsandbytes_at_scale() {
    let flips = check_blockwise_golden(&fixtures().join("bnb/blockwise_large.json"));
    eprintln!("8-bit codes where CUDA's rounding differs from the CPU's: {flips} of 1024000");
}

/// The same golden made on a GPU (`gen_bnb_blockwise_goldens.py --device cuda --out FILE`, as
/// scripts/gpu_check.sh does), when `QLORA_BNB_GOLDEN` names it: `cuda` mode gives its bytes.
#[test]
fn blockwise_cuda_matches_bitsandbytes_on_a_gpu() {
    let Some(path) = std::env::var_os("QLORA_BNB_GOLDEN") else {
        eprintln!("skipped: QLORA_BNB_GOLDEN is not set (scripts/gpu_check.sh sets it)");
        return;
    };
    let flips = check_blockwise_golden(std::path::Path::new(&path));
    eprintln!("8-bit codes where the CPU's rounding differs from CUDA's: {flips}");
}
