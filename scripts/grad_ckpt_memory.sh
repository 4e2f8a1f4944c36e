#!/usr/bin/env bash
# Peak RSS of one training step with and without gradient checkpointing (examples/grad_ckpt_memory.rs:
# NF4 Phi-3, hidden 1024, 8 layers, seq 1024, r=16 on all targets), side by side, with the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example grad_ckpt_memory -q
bin=target/release/examples/grad_ckpt_memory
plain=$($bin plain); ckpt=$($bin checkpointing)
echo "$plain"; echo "$ckpt"
p=$(sed -E 's/.*peak_rss_mib=([0-9]+).*/\1/' <<<"$plain"); c=$(sed -E 's/.*peak_rss_mib=([0-9]+).*/\1/' <<<"$ckpt")
m=$(sed -E 's/.*model_rss_mib=([0-9]+).*/\1/' <<<"$plain")
echo "peak RSS: plain ${p} MiB, checkpointing ${c} MiB (model alone ~${m} MiB); plain/checkpointing = $(python3 -c "print(round($p/$c, 2))"), activations (peak - model): $(python3 -c "print(round(($p-$m)/max($c-$m,1), 2))")x"
