//! Small, dependency-free SVG charts for training curves and reward-vs-KL scatter plots.
//!
//! Why hand-written: every plotting crate that lays out text needs font files (fontconfig or an
//! embedded TTF) to measure labels, which a clean CI machine may lack. SVG leaves text layout to
//! the viewer, so a chart needs only coordinates. Output is deterministic for equal input, which
//! keeps `irbridge demo` byte-for-byte reproducible.

use crate::fsutil::write_atomic;
use anyhow::{ensure, Result};
use std::fmt::Write as _;
use std::path::Path;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A polyline through the points in order.
    Line,
    /// A marker per point.
    Points,
    /// Both.
    LinePoints,
}

/// One named series of (x, y) points. Non-finite points are skipped when drawing.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Optional per-point labels drawn next to markers (empty: none).
    pub labels: Vec<String>,
    /// Line, markers or both.
    pub style: Style,
}

impl Series {
    /// A series drawn as a line.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            labels: Vec::new(),
            style: Style::Line,
        }
    }

    /// A series drawn as markers, each optionally labelled.
    pub fn points(name: impl Into<String>, points: Vec<(f64, f64)>, labels: Vec<String>) -> Self {
        Series {
            name: name.into(),
            points,
            labels,
            style: Style::Points,
        }
    }
}

/// A single chart with axes, ticks, a title and a legend.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title above the plot area.
    pub title: String,
    /// X-axis label.
    pub x_label: String,
    /// Y-axis label.
    pub y_label: String,
    /// The series, drawn in order with a fixed palette.
    pub series: Vec<Series>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Tableau-10: distinguishable, and stable across runs.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

const MARGIN_LEFT: f64 = 70.0;
/// The legend column's least width; it grows with the longest legend entry.
const MARGIN_RIGHT: f64 = 170.0;
/// Legend text width per character at font-size 12 (DejaVu Sans averages about 6.6 px; a little
/// more so that names with wide letters still fit).
const LEGEND_CHAR_WIDTH: f64 = 7.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 55.0;

impl Chart {
    /// An empty 720×440 chart.
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        Chart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series: Vec::new(),
            width: 720,
            height: 440,
        }
    }

    /// Adds a series (builder style).
    pub fn with(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// Renders the chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(finite)
            .collect();
        let (x_lo, x_hi) = padded_range(pts.iter().map(|p| p.0));
        let (y_lo, y_hi) = padded_range(pts.iter().map(|p| p.1));
        let (w, h) = (self.width as f64, self.height as f64);
        // Room for the widest y tick label and, left of it, the rotated axis title.
        let y_ticks = ticks(y_lo, y_hi);
        let widest = y_ticks.iter().map(|&t| fmt_tick(t).chars().count()).max().unwrap_or(1);
        let left = MARGIN_LEFT.max(40.0 + LEGEND_CHAR_WIDTH * widest as f64);
        let title_x = left - 16.0 - LEGEND_CHAR_WIDTH * widest as f64;
        // Swatch and gap (32 px) plus the text: a long entry such as `eval_rewards/accuracies`
        // narrows the plot area rather than running off the edge.
        let longest = self.series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0);
        let margin_right = MARGIN_RIGHT.max(32.0 + LEGEND_CHAR_WIDTH * longest as f64).min(w / 2.0);
        let (pw, ph) = (w - left - margin_right, h - MARGIN_TOP - MARGIN_BOTTOM);
        let sx = |x: f64| left + (x - x_lo) / (x_hi - x_lo) * pw;
        let sy = |y: f64| MARGIN_TOP + ph - (y - y_lo) / (y_hi - y_lo) * ph;

        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
        );
        let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            left + pw / 2.0,
            escape(&self.title)
        );
        // Grid, ticks and tick labels.
        for t in ticks(x_lo, x_hi) {
            let x = sx(t);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                MARGIN_TOP,
                MARGIN_TOP + ph,
                MARGIN_TOP + ph + 16.0,
                fmt_tick(t)
            );
        }
        for &t in &y_ticks {
            let y = sy(t);
            let _ = write!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left,
                left + pw,
                left - 6.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        let _ = write!(
            s,
            r##"<rect x="{left}" y="{MARGIN_TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#333"/>"##
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            h - 12.0,
            escape(&self.x_label)
        );
        let (lx, ly) = (title_x, MARGIN_TOP + ph / 2.0);
        let _ = write!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
            escape(&self.y_label)
        );
        // Series and legend.
        for (i, series) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let visible: Vec<(usize, (f64, f64))> = series
                .points
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, p)| finite(p))
                .collect();
            if matches!(series.style, Style::Line | Style::LinePoints) && visible.len() > 1 {
                let path: Vec<String> = visible
                    .iter()
                    .map(|(_, (x, y))| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                    .collect();
                let _ = write!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                    path.join(" ")
                );
            }
            if matches!(series.style, Style::Points | Style::LinePoints) || visible.len() == 1 {
                for &(k, (x, y)) in &visible {
                    let _ = write!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}" fill-opacity="0.85"/>"#,
                        sx(x),
                        sy(y)
                    );
                    if let Some(label) = series.labels.get(k).filter(|l| !l.is_empty()) {
                        let _ = write!(
                            s,
                            r#"<text x="{:.1}" y="{:.1}" font-size="10" fill="{color}">{}</text>"#,
                            sx(x) + 6.0,
                            sy(y) - 5.0,
                            escape(label)
                        );
                    }
                }
            }
            let ly = MARGIN_TOP + 10.0 + 18.0 * i as f64;
            let lx = left + pw + 14.0;
            let _ = write!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                ly - 10.0,
                lx + 18.0,
                ly,
                escape(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// Writes the SVG atomically; an output name must end in `.svg`.
    pub fn save(&self, path: &Path) -> Result<()> {
        ensure!(
            path.extension().is_some_and(|e| e == "svg"),
            "{}: charts are written as SVG; use a .svg file name",
            path.display()
        );
        write_atomic(path, self.to_svg().as_bytes())
    }
}

/// The data range widened by 5% each side; a degenerate or empty range becomes a unit one.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= f64::EPSILON * lo.abs().max(1.0) {
        let pad = (lo.abs() * 0.1).max(0.5);
        return (lo - pad, hi + pad);
    }
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// Tick positions at the finest 1-2-5 step that leaves at most eight ticks inside [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mag = 10f64.powf(((hi - lo) / 8.0).log10().floor());
    let range = |step: f64| ((lo / step).ceil() as i64, (hi / step).floor() as i64);
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| {
            let (a, b) = range(s);
            b - a < 8
        })
        .unwrap_or(10.0 * mag);
    let (first, last) = range(step);
    (first..=last).map(|k| k as f64 * step).collect()
}

/// Short tick text: integers without decimals, otherwise up to four significant digits.
fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1e5 || v.abs() < 1e-3 {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// XML text escaping for titles, labels and legend entries.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside() {
        let t = ticks(-0.07, 1.13);
        let want = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
        assert_eq!(t.len(), want.len(), "{t:?}");
        assert!(t.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{t:?}");
        assert_eq!(fmt_tick(t[3]), "0.6");
        let t = ticks(3.0, 1234.0);
        assert!(t.iter().all(|v| (3.0..=1234.0).contains(v)) && t.len() >= 4, "{t:?}");
    }

    #[test]
    fn degenerate_and_nonfinite_data_still_render() {
        let c = Chart::new("t <&>", "x", "y")
            .with(Series::line("flat", vec![(0.0, 2.0), (1.0, 2.0), (2.0, f64::NAN)]))
            .with(Series::points("one", vec![(1.0, 2.0)], vec!["a".into()]));
        let svg = c.to_svg();
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(svg.matches("<circle").count(), 1);
        assert_eq!(svg.matches("<polyline").count(), 1);
        let empty = Chart::new("empty", "x", "y").to_svg();
        assert!(empty.ends_with("</svg>\n"));
    }

    #[test]
    fn legend_column_grows_with_the_longest_entry() {
        let short = Chart::new("c", "x", "y").with(Series::line("loss", vec![(0.0, 1.0), (1.0, 0.0)]));
        let long = short
            .clone()
            .with(Series::line("eval_rewards/accuracies_of_a_run", vec![(0.0, 1.0)]));
        let frame_width = |svg: &str| -> f64 {
            let frame = svg.split("<rect x=\"70\"").nth(1).expect("the plot frame");
            frame
                .split("width=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (ws, wl) = (frame_width(&short.to_svg()), frame_width(&long.to_svg()));
        assert_eq!(ws, 720.0 - 70.0 - 170.0);
        // 32 px of swatch and gap + 7 px per character of the 32-character entry.
        assert_eq!(wl, 720.0 - 70.0 - (32.0 + 7.0 * 32.0));
    }

    #[test]
    fn save_requires_svg_extension() {
        let dir = std::env::temp_dir().join(format!("irbridge-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Chart::new("c", "x", "y").with(Series::line("s", vec![(0.0, 1.0), (1.0, 0.0)]));
        let err = c.save(&dir.join("c.png")).unwrap_err().to_string();
        assert!(err.contains("SVG"), "{err}");
        c.save(&dir.join("c.svg")).unwrap();
        assert!(std::fs::read_to_string(dir.join("c.svg")).unwrap().starts_with("<svg"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
