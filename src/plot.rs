//! The loss curve of a run (train loss per step, eval loss points) as an SVG image, from
//! metrics.jsonl; for a preference objective a second panel with the reward margin
//! (`rewards/margins`, train and eval).

use crate::train::trainer::Metric;
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One panel: the train series as a line, the eval points as dots.
struct Panel {
    title: &'static str,
    y: &'static str,
    train: Vec<(f64, f64)>,
    eval: Vec<(f64, f64)>,
}

fn series(all: &[Metric], kind: &str, value: impl Fn(&Metric) -> Option<f64>) -> Vec<(f64, f64)> {
    all.iter()
        .filter(|m| m.kind == kind)
        .filter_map(|m| value(m).map(|v| (m.step as f64, v)))
        .filter(|p| p.1.is_finite())
        .collect()
}

fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel, max_step: f64) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (lo, hi) = p
        .train
        .iter()
        .chain(&p.eval)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), q| {
            (lo.min(q.1), hi.max(q.1))
        });
    let (lo, hi) = if lo.is_finite() {
        let pad = 0.05 * (hi - lo).abs().max(1e-9);
        (lo - pad, hi + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_step, lo..hi)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(p.y)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(p.train.iter().copied(), &BLUE))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(p.eval.iter().map(|&q| Circle::new(q, 4, RED.filled())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Reads `metrics` and draws `out` (written atomically).
pub fn loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let all: Vec<Metric> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut panels = vec![Panel {
        title: "loss (blue: train, red: eval)",
        y: "loss",
        train: series(&all, "train", |m| Some(m.loss)),
        eval: series(&all, "eval", |m| Some(m.loss)),
    }];
    let margin = |m: &Metric| m.value("rewards/margins");
    if all.iter().any(|m| margin(m).is_some()) {
        panels.push(Panel {
            title: "reward margin, rewards/margins (blue: train, red: eval)",
            y: "chosen − rejected reward",
            train: series(&all, "train", margin),
            eval: series(&all, "eval", margin),
        });
    }
    let max_step = panels
        .iter()
        .flat_map(|p| p.train.iter().chain(&p.eval))
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (800, 480 * panels.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let areas = root.split_evenly((panels.len(), 1));
        for (area, p) in areas.iter().zip(&panels) {
            draw(area, p, max_step)?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    crate::fsx::write_atomic(out, svg.as_bytes())
}
