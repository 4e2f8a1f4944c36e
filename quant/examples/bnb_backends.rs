//! The flip table: how many codes bitsandbytes' CUDA and CPU backends write differently for the
//! same weights (`BnbBackend`), on one Phi-3-mini decoder layer of random bf16 weights (N(0, σ),
//! σ = 0.02 as the checkpoints' initialisation; real weights are close to that per block).
//!
//! Run: `cargo run --release -p qlora-quant --example bnb_backends [-- --layers N]`

use half::bf16;
use qlora_quant::{Absmax, Blocksize, BnbBackend, QuantType, Quantized};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Phi-3-mini's four block linears, `[out, in]`.
const LINEARS: [(&str, [usize; 2]); 4] = [
    ("qkv_proj", [9216, 3072]),
    ("o_proj", [3072, 3072]),
    ("gate_up_proj", [16384, 3072]),
    ("down_proj", [3072, 8192]),
];

fn nibble_diffs(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x ^ y) & 0xF0 != 0) as usize + ((x ^ y) & 0x0F != 0) as usize)
        .sum()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let layers: usize = match args.iter().position(|a| a == "--layers") {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--layers needs a number"))?
            .parse()?,
        None => 1,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let normal = Normal::new(0f32, 0.02)?;
    println!("| linear | 4-bit codes | differ | absmax codes | differ |");
    println!("|---|---|---|---|---|");
    let (mut n4, mut d4, mut n8, mut d8) = (0usize, 0usize, 0usize, 0usize);
    for layer in 0..layers {
        for (name, shape) in LINEARS {
            let n = shape[0] * shape[1];
            let w: Vec<f32> = (0..n)
                .map(|_| bf16::from_f32(normal.sample(&mut rng)).to_f32())
                .collect();
            let q = |b| {
                let dtype = candle_core::DType::BF16;
                Quantized::quantize_as(
                    &w,
                    &shape,
                    dtype,
                    QuantType::Nf4,
                    Blocksize::DEFAULT,
                    true,
                    b,
                )
            };
            let (cuda, cpu) = (q(BnbBackend::Cuda)?, q(BnbBackend::Cpu)?);
            let (Absmax::Nested(a), Absmax::Nested(b)) = (&cuda.absmax, &cpu.absmax) else {
                anyhow::bail!("double quantization expected");
            };
            let codes4 = nibble_diffs(&cuda.packed, &cpu.packed);
            let codes8 = a.codes.iter().zip(&b.codes).filter(|(x, y)| x != y).count();
            println!(
                "| {layer}.{name} | {n} | {codes4} | {} | {codes8} ({:.3} %) |",
                a.codes.len(),
                100.0 * codes8 as f64 / a.codes.len() as f64
            );
            (n4, d4, n8, d8) = (n4 + n, d4 + codes4, n8 + a.codes.len(), d8 + codes8);
        }
    }
    println!(
        "| all | {n4} | {d4} | {n8} | {d8} ({:.3} %) |",
        100.0 * d8 as f64 / n8 as f64
    );
    Ok(())
}
