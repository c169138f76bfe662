//! The bench's pictures, as one self-contained SVG: drain throughput of `demo.add` against
//! concurrency (taskhost fresh and reusing instances, Celery and the echo floor as level
//! lines), and the latency distribution at each offered rate (latency against percentile,
//! one line per contender). Plain SVG text, no dependencies: it renders on GitHub and in any
//! browser.

use std::fmt::Write as _;

/// A line of points, or a level (one y across the chart) when it has a single point.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel: axes, titles, and its series.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Tick positions and their labels on the x axis.
    pub x_ticks: Vec<(f64, String)>,
    /// A logarithmic y axis (decades), for values spanning several orders of magnitude.
    pub log_y: bool,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 360.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 110.0;
const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// The panels side by side, two to a row, under `caption`.
pub fn svg(caption: &str, panels: &[Panel]) -> String {
    let columns = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(2).max(1);
    let (width, height) = (WIDTH * columns as f64, HEIGHT * rows as f64 + MARGIN_TOP);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"13\">{}</text>\n",
        escape(caption)
    );
    for (i, panel) in panels.iter().enumerate() {
        let x = WIDTH * (i % 2) as f64;
        let y = MARGIN_TOP + HEIGHT * (i / 2) as f64;
        draw(&mut out, panel, x, y);
    }
    out.push_str("</svg>\n");
    out
}

fn draw(out: &mut String, panel: &Panel, left: f64, top: f64) {
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let (x0, y0) = (left + MARGIN_LEFT, top + MARGIN_TOP);
    let xs = panel.x_ticks.iter().map(|(x, _)| *x);
    let (x_min, x_max) = bounds(xs.chain(panel.series.iter().flat_map(|s| {
        let multi = s.points.len() > 1;
        s.points.iter().filter(move |_| multi).map(|p| p.0)
    })));
    let values = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
    };
    let positive = || values().filter(|v| *v > 0.0);
    let (low, high) = (
        positive().fold(f64::INFINITY, f64::min).log10().floor(),
        positive().fold(0.0, f64::max).log10().ceil(),
    );
    let scale = if panel.log_y && low.is_finite() && high.is_finite() {
        Scale::Log { low, high }
    } else {
        Scale::Linear {
            max: nice_ceiling(values().fold(0.0, f64::max)),
        }
    };
    let px = |x: f64| x0 + (x - x_min) / (x_max - x_min).max(f64::EPSILON) * plot_w;
    let py = |y: f64| y0 + plot_h - scale.fraction(y) * plot_h;
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{}</text>",
        left + MARGIN_LEFT,
        top + 22.0,
        escape(&panel.title)
    );
    // Axes, grid and ticks.
    let _ = writeln!(
        out,
        "<rect x=\"{x0}\" y=\"{y0}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#444\"/>"
    );
    for (value, label) in scale.ticks() {
        let y = py(value);
        let _ = writeln!(
            out,
            "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            x0 + plot_w,
            x0 - 6.0,
            y + 4.0,
        );
    }
    for (x, label) in &panel.x_ticks {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            px(*x),
            y0 + plot_h + 16.0,
            escape(label)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text transform=\"translate({:.1},{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        x0 + plot_w / 2.0,
        y0 + plot_h + 34.0,
        escape(&panel.x_label),
        left + 16.0,
        y0 + plot_h / 2.0,
        escape(&panel.y_label)
    );
    // The series, and a legend under the axis label.
    for (i, series) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = match series.points.as_slice() {
            [(_, level)] => vec![
                format!("{:.1},{:.1}", x0, py(*level)),
                format!("{:.1},{:.1}", x0 + plot_w, py(*level)),
            ],
            points => points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect(),
        };
        let dash = if series.points.len() == 1 {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>",
            path.join(" ")
        );
        if series.points.len() > 1 && series.points.len() <= 12 {
            for (x, y) in &series.points {
                let _ = writeln!(
                    out,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                    px(*x),
                    py(*y)
                );
            }
        }
        let (lx, ly) = (
            x0 + (i % 2) as f64 * plot_w / 2.0,
            y0 + plot_h + 52.0 + (i / 2) as f64 * 16.0,
        );
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            lx + 22.0,
            ly,
            escape(&series.label)
        );
    }
}

/// How y values map onto the plot's height.
enum Scale {
    Linear {
        max: f64,
    },
    /// Decades 10^low to 10^high.
    Log {
        low: f64,
        high: f64,
    },
}

impl Scale {
    /// Where `y` falls, 0 at the bottom and 1 at the top (clamped).
    fn fraction(&self, y: f64) -> f64 {
        let f = match self {
            Self::Linear { max } => y / max,
            Self::Log { low, high } => {
                (y.max(f64::MIN_POSITIVE).log10() - low) / (high - low).max(1.0)
            }
        };
        f.clamp(0.0, 1.0)
    }

    /// The grid lines: five on a linear scale, one per decade on a log one.
    fn ticks(&self) -> Vec<(f64, String)> {
        match self {
            Self::Linear { max } => (0..=4)
                .map(|i| {
                    let value = max * f64::from(i) / 4.0;
                    let label = if i == 0 {
                        "0".to_owned()
                    } else {
                        crate::report::number(value)
                    };
                    (value, label)
                })
                .collect(),
            Self::Log { low, high } => {
                let (low, high) = (*low as i32, (*high as i32).max(*low as i32 + 1));
                (low..=high)
                    .map(|d| {
                        let value = 10f64.powi(d);
                        (value, crate::report::number(value))
                    })
                    .collect()
            }
        }
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (min, max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if min.is_finite() && max > min {
        (min, max)
    } else {
        (0.0, 1.0)
    }
}

/// The smallest 1, 2 or 5 × 10^k at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    if !(value.is_finite() && value > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= value)
        .unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The x position of percentile `p` (0 to 100) on a "nines" scale: 0 at the median's left
/// edge, 1 at 90, 2 at 99, 3 at 99.9.
pub fn nines(p: f64) -> f64 {
    -(1.0 - p / 100.0).max(1e-4).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_one_svg_document_with_every_series_labelled() {
        let panel = Panel {
            title: "t <1>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_ticks: vec![(1.0, "1".into()), (16.0, "16".into())],
            log_y: false,
            series: vec![
                Series {
                    label: "line".into(),
                    points: vec![(1.0, 10.0), (16.0, 30.0)],
                },
                Series {
                    label: "level & floor".into(),
                    points: vec![(0.0, 20.0)],
                },
            ],
        };
        let svg = svg("caption", &[panel]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;") && svg.contains("level &amp; floor"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }

    #[test]
    fn a_log_scale_spans_whole_decades() {
        let scale = Scale::Log {
            low: -1.0,
            high: 4.0,
        };
        assert_eq!(scale.ticks().len(), 6);
        assert!((scale.fraction(0.1) - 0.0).abs() < 1e-9);
        assert!((scale.fraction(10_000.0) - 1.0).abs() < 1e-9);
        assert!((scale.fraction(10.0) - 0.4).abs() < 1e-9);
    }

    #[test]
    fn nice_ceilings_and_nines() {
        assert_eq!(nice_ceiling(13_000.0), 20_000.0);
        assert_eq!(nice_ceiling(0.8), 1.0);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!(nines(50.0) > 0.0 && nines(50.0) < 1.0);
    }
}
