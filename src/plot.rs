//! The loss curve of a run (train loss per step, eval loss points) as an SVG image, from
//! metrics.jsonl.

use crate::train::trainer::Metric;
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// Reads `metrics` and draws `out` (written atomically).
pub fn loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let all: Vec<Metric> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let train: Vec<(f64, f64)> = all
        .iter()
        .filter(|m| m.kind == "train")
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let eval: Vec<(f64, f64)> = all
        .iter()
        .filter(|m| m.kind == "eval")
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let max_step = train.iter().chain(&eval).map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = train
        .iter()
        .chain(&eval)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(hi) * 0.95, hi * 1.05 + 1e-9)
    } else {
        (0.0, 1.0)
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss (blue: train, red: eval)", ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_step, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()?;
        chart.draw_series(LineSeries::new(train, &BLUE))?;
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
        root.present()?;
    }
    crate::fsx::write_atomic(out, svg.as_bytes())
}
