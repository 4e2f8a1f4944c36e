//! `qlora plan`.

use super::train::TrainArgs;
use crate::plan::{self, Target, inputs};
use anyhow::{Context, Result};
use clap::Args;
use std::path::Path;
use std::process::ExitCode;

/// Predict a training run's peak memory before running it: the peak, by phase and term, whether it
/// fits, and if not what would; and the disk it writes (checkpoints, adapter, metrics, plot)
/// against the output's free space. Takes train's settings (flags, --config, --set); --data is
/// optional (with it, the encoded rows are counted too). Exit code 0 when both fit, 1 when not.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Print one JSON object (`peak_bytes`, `fits`, `budget_bytes`, `phases`, advice).
    #[arg(long)]
    json: bool,
}

pub fn run(args: PlanArgs) -> Result<ExitCode> {
    let baseline = crate::memstat::resident_bytes();
    let cfg = args.train.settings()?;
    let model_dir = crate::hub::resolve(&cfg.training.model)?;
    // A GPU run can be planned on a machine without one (or a build without CUDA): the device is
    // opened only to learn its free memory.
    let spec = cfg
        .training
        .device
        .parse::<crate::device::DeviceSpec>()
        .context("training.device")?;
    let (device, target) = match spec {
        crate::device::DeviceSpec::Cuda(_) => match spec.open() {
            Ok(d) => (Some(d), Target::Cuda),
            Err(_) => (None, Target::Cuda),
        },
        _ => {
            let d = spec.open()?;
            let t = Target::of(&d);
            (Some(d), t)
        }
    };
    let (tok, tokenizer) = crate::data::TokenizerBundle::load_measured(&model_dir)?;
    let (rows, train_rows) = crate::train::trainer::plan_data(&cfg, &tok).context("data.train")?;
    let mut p = inputs::for_run(&cfg, &model_dir, target, tokenizer, rows, baseline)?;
    let given = args
        .train
        .budget
        .as_deref()
        .map(plan::parse_bytes)
        .transpose()?;
    let budget = given.or_else(|| device.as_ref().and_then(plan::budget));
    // "auto" checkpointing: the policies the trainer would pick (under --budget, else what is
    // free less a margin).
    let choice = p.auto_checkpointing.then(|| {
        let c = p.choose(given.or_else(|| budget.map(|b| b - plan::auto_margin(b))));
        p.checkpointing = crate::train::policy::Checkpointing::Blocks(c.chosen.policies.clone());
        c
    });
    let verdict = p.verdict(budget);
    let output = Path::new(&cfg.training.output);
    let steps = plan::disk::total_steps(&cfg, train_rows, 1);
    let disk = plan::disk::plan(&cfg, &p.cfg, steps)?;
    let disk_verdict = disk.verdict(output);
    if args.json {
        let planned = p.plan();
        let out = serde_json::json!({
            "peak_bytes": verdict.peak_bytes,
            "fits": verdict.fits,
            "budget_bytes": verdict.budget_bytes,
            "peak_phase": planned.peak_phase,
            "phases": planned.phases,
            "max_seq_len_that_fits": verdict.max_seq_len_that_fits,
            "batch_size_that_fits": verdict.batch_size_that_fits,
            "switches": verdict.switches.iter().map(|(s, b)| serde_json::json!({"switch": s, "peak_bytes": b})).collect::<Vec<_>>(),
            "disk": disk,
            "disk_needed_bytes": disk_verdict.needed_bytes,
            "disk_free_bytes": disk_verdict.free_bytes,
            "disk_fits": disk_verdict.fits,
            "checkpointing": choice.as_ref().map_or_else(
                || serde_json::json!({
                    "policies": (0..p.cfg.num_hidden_layers).map(|l| p.checkpointing.of(l)).collect::<Vec<_>>(),
                    "recompute_flops": p.recompute_flops(),
                    "forward_flops": p.forward_flops(),
                }),
                |c| serde_json::json!({
                    "auto": c,
                    "policies": c.chosen.policies,
                    "recompute_flops": c.chosen.recompute_flops,
                    "forward_flops": c.forward_flops,
                }),
            ),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let s = &p.step;
        println!(
            "{}: {} layers, hidden {}, vocab {}; {} base, r={} on {}; {} × {} tokens{}{}, {}-byte compute on {}",
            model_dir.display(),
            p.cfg.num_hidden_layers,
            p.cfg.hidden_size,
            p.cfg.vocab_size,
            if s.nf4 { "NF4" } else { "dense" },
            s.adapted.first().map_or(0, |a| a.1),
            s.adapted.iter().map(|a| a.0).collect::<Vec<_>>().join(","),
            s.batch,
            s.seq,
            if s.seq < cfg.training.max_seq_len {
                format!(
                    " (the longest row; max_seq_len {})",
                    cfg.training.max_seq_len
                )
            } else {
                String::new()
            },
            if p.auto_checkpointing {
                ", gradient checkpointing auto".to_string()
            } else {
                format!(
                    ", gradient checkpointing: {}",
                    p.checkpointing.describe(p.cfg.num_hidden_layers)
                )
            },
            s.elem,
            match target {
                Target::Cpu { threads } => format!("the CPU ({threads} threads)"),
                Target::Cuda => device
                    .as_ref()
                    .map_or_else(|| "a CUDA GPU".to_string(), crate::device::name),
            }
        );
        if cfg.data.train.is_empty() {
            println!("(no --data: the encoded rows are not counted)");
        }
        if let Some(c) = &choice {
            print!("{}", c.explain());
        }
        print!("{}", plan::explain(&p, &verdict));
        print!("{}", disk.explain(output, &disk_verdict));
    }
    Ok(if verdict.fits && disk_verdict.fits {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
