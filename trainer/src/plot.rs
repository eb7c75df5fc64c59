//! The loss curve of a run as an SVG image.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::train::Metric;

/// Draws train loss per step and eval loss at its steps into `path`.
pub fn loss_svg(metrics: &[Metric], path: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> =
        metrics.iter().filter(|m| m.kind == "train" && m.loss.is_finite()).map(|m| (m.step as f64, m.loss)).collect();
    let eval: Vec<(f64, f64)> =
        metrics.iter().filter(|m| m.kind == "eval" && m.loss.is_finite()).map(|m| (m.step as f64, m.loss)).collect();
    let all = train.iter().chain(&eval);
    let (mut ymin, mut ymax, mut xmax) = (f64::MAX, f64::MIN, 1.0f64);
    for &(x, y) in all {
        ymin = ymin.min(y);
        ymax = ymax.max(y);
        xmax = xmax.max(x);
    }
    if ymin > ymax {
        (ymin, ymax) = (0.0, 1.0);
    }
    let pad = ((ymax - ymin) * 0.05).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let e = |err: &dyn std::fmt::Display| Error::Input(format!("drawing the loss curve: {err}"));
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("oxtune loss", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, (ymin - pad)..(ymax + pad))
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|x| e(&x))?;
        chart
            .draw_series(LineSeries::new(train, &BLUE))
            .map_err(|x| e(&x))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(eval, &RED))
            .map_err(|x| e(&x))?
            .label("eval")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    crate::io::write_atomic(path, svg.as_bytes())
}
