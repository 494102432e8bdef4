//! The SVG chart: every quantum's duration over the run, one colour per CPU.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use crate::NoiseReport;

const SIZE: (u32, u32) = (1200, 700);

/// Distinct colours for the CPUs (Palette99 after the tenth).
fn colour(i: usize) -> RGBColor {
    const FIRST: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    FIRST.get(i).copied().unwrap_or_else(|| {
        let (r, g, b) = Palette99::pick(i).rgb();
        RGBColor(r, g, b)
    })
}

/// Writes the chart of `report` to `path`.
pub fn write_svg(report: &NoiseReport, path: &Path, log_y: bool) -> anyhow::Result<()> {
    let all = report.cpus.iter().flat_map(|c| c.durations_us.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, 0f64), |(lo, hi), d| (lo.min(d), hi.max(d)));
    if !lo.is_finite() {
        anyhow::bail!("no durations to draw");
    }
    let x = 0..report.samples;
    if log_y {
        // Log scale: from just below the quantum to just above the worst sample.
        let lo = (lo * 0.9).max(1e-3);
        draw(report, path, x, (lo..(hi * 1.1).max(lo * 1.01)).log_scale())
    } else {
        draw(report, path, x, 0f64..(hi * 1.05).max(1e-3))
    }
}

fn draw<Y>(report: &NoiseReport, path: &Path, x: Range<usize>, y: Y) -> anyhow::Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "FWQ OS noise: quantum {} µs, {} samples per CPU (CPU {})",
        report.quantum_us,
        report.samples,
        lwk_partition::format_cpu_list(&report.cpus.iter().map(|c| c.cpu).collect::<Vec<_>>())
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("sample (in the order run)")
        .y_desc("duration of the quantum (µs)")
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .y_label_formatter(&|v: &f64| if v.abs() >= 10.0 || *v == 0.0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, cpu) in report.cpus.iter().enumerate() {
        let c = colour(i);
        let s = &cpu.summary;
        // A point that lands on a pixel where this series has a point already
        // would not change the picture: leave it out, which keeps a chart of
        // 20000 samples small. Every distinct point, every outlier, is drawn.
        let mut seen = HashSet::new();
        let points: Vec<(usize, f64)> = cpu
            .durations_us
            .iter()
            .enumerate()
            .map(|(n, &d)| (n, d))
            .filter(|p| seen.insert(chart.backend_coord(p)))
            .collect();
        chart
            .draw_series(points.into_iter().map(move |p| Circle::new(p, 2, c.mix(0.6).filled())))?
            .label(format!(
                "CPU {}: median {:.2} µs, max {:.1} µs, noise {:.3}%",
                cpu.cpu, s.median_us, s.max_us, s.noise_percent
            ))
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}
