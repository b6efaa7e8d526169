//! Line charts (SVG or PNG) of optimisation curves: fitness, loss, σ, cost… against the
//! generation or the time.
//!
//! A chart is one or more [`Panel`]s stacked top to bottom that share one x axis (named below
//! the bottom panel) under a title. Each panel has its own y axis and holds curves
//! ([`Series`]), each in its own colour from a fixed palette of nine (repeating from the tenth
//! curve of a panel on), with a legend naming them when the panel has more than one (in the
//! corner where it hides the fewest points), and [`Marker`]s: vertical dashed grey lines with
//! a label at the top (a control command applied, a resumed run). Labels longer than 40
//! characters are clipped with an ellipsis.
//!
//! The x axis covers every finite point and marker of every panel; a y axis covers its panel's
//! finite points with a little room above and below; a single x value is widened by ±0.5.
//! Points with a NaN or infinite coordinate (or one beyond ±10³⁰⁰, which no axis can span) are
//! skipped, leaving a gap in their curve; a panel without a finite point is drawn empty, with
//! its axis name. A panel asks for a logarithmic y axis with [`Panel::log_y`]; when one of its
//! finite values is zero or negative (or they span more decades than an axis can, about 300)
//! it is drawn linear instead.
//!
//! Text is measured, and PNG glyphs rasterised, with the Noto Sans compiled into the binary, as
//! for [`crate::tune::chart`]: the picture does not depend on the machine's fonts.
//!
//! This module draws what it is given; it knows nothing of where the numbers come from.
//!
//! # Examples
//! ```
//! use hyperfunc::runs::chart::{line_chart, Marker, Panel, Series};
//!
//! let fitness = Panel {
//!     y_label: "fitness".into(),
//!     series: vec![
//!         Series { label: "mean".into(), points: vec![(0.0, 0.2), (1.0, 0.5), (2.0, 0.7)] },
//!         Series { label: "best".into(), points: vec![(0.0, 0.4), (1.0, 0.8), (2.0, 0.9)] },
//!     ],
//!     markers: vec![Marker { x: 1.0, label: "sigma ×0.5".into() }],
//!     log_y: false,
//! };
//! let sigma = Panel {
//!     y_label: "sigma".into(),
//!     series: vec![Series {
//!         label: "sigma".into(),
//!         points: vec![(0.0, 0.1), (1.0, 0.05), (2.0, 0.05)],
//!     }],
//!     log_y: true,
//!     ..Panel::default()
//! };
//! let path = std::env::temp_dir().join(format!("hyperfunc-doc-lines-{}.svg", std::process::id()));
//! line_chart(&path, "xor run", "generation", &[fitness, sigma])?;
//! let svg = std::fs::read_to_string(&path).unwrap();
//! assert!(svg.starts_with("<svg") && svg.contains("xor run") && svg.contains("best"));
//! # std::fs::remove_file(&path).unwrap();
//! # Ok::<(), hyperfunc::Error>(())
//! ```

use std::ops::Range;
use std::path::Path;

use plotters::coord::combinators::BindKeyPoints;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::tune::chart::{
    clip_label, drawing_failed, ensure_font, render_svg, tick_label, write_figure, DrawResult,
    Figure, Format,
};

/// Canvas width, pixels.
const WIDTH: u32 = 960;
/// Height of one panel, pixels (the bottom one has the x axis below it as well).
const PANEL: u32 = 260;
/// Blank border around the chart, pixels.
const MARGIN: u32 = 16;
/// Room for the title, pixels.
const CAPTION: u32 = 44;
/// Room for the x axis (ticks and name) below the bottom panel, pixels.
const AXIS: u32 = 48;
/// Room for a y axis (ticks and name) left of each panel, pixels; the same for every panel so
/// that their x axes line up.
const Y_AXIS: u32 = 88;
/// Blank space between two panels, pixels.
const GAP: u32 = 14;
/// Blank space right of the panels, pixels.
const RIGHT: u32 = 8;
/// More panels than this is an error: the chart would be unreadable (and a PNG huge).
const MAX_PANELS: usize = 32;
/// Marker labels are staggered over this many rows so that close markers stay readable.
const MARKER_ROWS: usize = 3;

const TITLE_PX: f64 = 24.0;
const AXIS_PX: f64 = 14.0;
const LEGEND_PX: f64 = 13.0;
const MARKER_PX: f64 = 12.0;

const TEXT_COLOR: RGBColor = RGBColor(33, 33, 33);
const GRID_COLOR: RGBColor = RGBColor(225, 225, 225);
const MARKER_COLOR: RGBColor = RGBColor(130, 130, 130);
/// Curve colours, in order (Tableau 10 without its grey, which markers use).
const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One curve.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The curve's name, shown in its panel's legend when the panel has more than one curve;
    /// clipped to 40 characters.
    pub label: String,
    /// The points `(x, y)`, joined in the order given. A point with a NaN or infinite
    /// coordinate is skipped and breaks the line there; a point alone between two gaps is
    /// drawn as a dot.
    pub points: Vec<(f64, f64)>,
}

/// A vertical marker (a control command applied, a resume), drawn as a dashed line with its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Marker {
    /// Where the line is drawn, on the shared x axis (a NaN or infinite one is skipped, as is
    /// one beyond ±10³⁰⁰).
    pub x: f64,
    /// Shown at the top of the line; clipped to 40 characters.
    pub label: String,
}

/// One stacked panel: its y axis name, its curves, its markers.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Panel {
    /// The name of the panel's y axis (`"fitness"`, `"sigma"`); may be empty.
    pub y_label: String,
    /// The panel's curves, coloured from the palette in this order.
    pub series: Vec<Series>,
    /// The panel's vertical markers.
    pub markers: Vec<Marker>,
    /// A logarithmic y axis. Ignored (the axis stays linear) when a finite value of the panel
    /// is zero or negative, the panel has no finite point, or its values span more than about
    /// 300 decades.
    pub log_y: bool,
}

/// Draws panels stacked top to bottom sharing one x axis named `x_label`, title on top.
///
/// The chart is written to `path`, as SVG or PNG by its extension, `.svg` or `.png` (either
/// case). It is 960 pixels wide and about 260 pixels high per panel. See the
/// [module documentation](self) for how points, gaps, markers and logarithmic axes are drawn.
///
/// # Errors
/// [`Error::InvalidConfig`] for another extension, no panels or more than 32 — nothing is
/// written then; [`Error::File`] when the file cannot be written.
///
/// # Examples
/// ```
/// use hyperfunc::runs::chart::{line_chart, Panel, Series};
///
/// let loss = Panel {
///     y_label: "loss".into(),
///     series: vec![Series {
///         label: "loss".into(),
///         points: vec![(0.0, 1.0), (1.0, 0.3), (2.0, 0.1)],
///     }],
///     log_y: true,
///     ..Panel::default()
/// };
/// let path = std::env::temp_dir().join(format!("hyperfunc-doc-loss-{}.png", std::process::id()));
/// line_chart(&path, "Loss", "generation", &[loss])?;
/// assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub fn line_chart(
    path: impl AsRef<Path>,
    title: &str,
    x_label: &str,
    panels: &[Panel],
) -> Result<()> {
    let path = path.as_ref();
    let format = Format::of(path)?;
    let chart = LineChart::new(title, x_label, panels)?;
    write_figure(path, format, &chart)
}

/// The same chart as an SVG string.
///
/// # Errors
/// [`Error::InvalidConfig`] for no panels or more than 32.
///
/// # Examples
/// ```
/// use hyperfunc::runs::chart::{line_chart_svg, Marker, Panel, Series};
///
/// let panel = Panel {
///     y_label: "fitness".into(),
///     // The NaN leaves a gap in the curve.
///     series: vec![Series {
///         label: "best".into(),
///         points: vec![(0.0, 0.5), (f64::NAN, 1.0), (2.0, 0.9)],
///     }],
///     markers: vec![Marker { x: 1.0, label: "resumed".into() }],
///     log_y: false,
/// };
/// let svg = line_chart_svg("Fitness", "generation", &[panel])?;
/// assert!(svg.starts_with("<svg") && svg.contains("resumed"));
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub fn line_chart_svg(title: &str, x_label: &str, panels: &[Panel]) -> Result<String> {
    render_svg(&LineChart::new(title, x_label, panels)?)
}

/// Everything worked out before drawing: clipped labels, curves split at their gaps, ranges.
struct LineChart<'a> {
    title: &'a str,
    x_label: &'a str,
    /// The shared x axis.
    x: Range<f64>,
    panels: Vec<PanelPlan<'a>>,
}

/// One panel, ready to draw.
struct PanelPlan<'a> {
    y_label: &'a str,
    /// The y axis; positive when `log_y`.
    y: Range<f64>,
    log_y: bool,
    /// The y ticks of a logarithmic axis (a linear one picks its own).
    log_ticks: Vec<f64>,
    curves: Vec<Curve>,
    /// Where the legend goes; `None` without one (a single curve).
    legend: Option<SeriesLabelPosition>,
    /// Sorted by x.
    markers: Vec<(f64, String)>,
}

/// One series, ready to draw.
struct Curve {
    label: String,
    color: RGBColor,
    /// Runs of consecutive drawable points.
    runs: Vec<Vec<(f64, f64)>>,
}

impl<'a> LineChart<'a> {
    fn new(title: &'a str, x_label: &'a str, panels: &'a [Panel]) -> Result<Self> {
        if panels.is_empty() {
            return Err(Error::config(
                "chart panels",
                "the list of panels is empty; a line chart needs at least one",
            ));
        }
        if panels.len() > MAX_PANELS {
            return Err(Error::config(
                "chart panels",
                format!("{} panels; at most {MAX_PANELS} fit a chart", panels.len()),
            ));
        }
        ensure_font()?;

        let mut xs = Bounds::default();
        let mut panels: Vec<PanelPlan<'a>> = panels
            .iter()
            .map(|panel| {
                let curves: Vec<Curve> = panel
                    .series
                    .iter()
                    .zip(PALETTE.iter().cycle())
                    .map(|(s, &color)| Curve {
                        label: clip_label(&s.label),
                        color,
                        runs: finite_runs(&s.points),
                    })
                    .collect();
                let mut ys = Bounds::default();
                for &(x, y) in curves.iter().flat_map(|c| c.runs.iter().flatten()) {
                    xs.add(x);
                    ys.add(y);
                }
                let mut markers: Vec<(f64, String)> = panel
                    .markers
                    .iter()
                    .filter(|m| drawable(m.x))
                    .map(|m| (m.x, clip_label(&m.label)))
                    .collect();
                markers.sort_by(|a, b| a.0.total_cmp(&b.0));
                for &(x, _) in &markers {
                    xs.add(x);
                }
                let log_range = if panel.log_y { ys.log_range() } else { None };
                PanelPlan {
                    y_label: &panel.y_label,
                    log_y: log_range.is_some(),
                    log_ticks: log_range.as_ref().map(log_ticks).unwrap_or_default(),
                    y: log_range.unwrap_or_else(|| ys.linear_range()),
                    curves,
                    legend: None,
                    markers,
                }
            })
            .collect();
        let x = xs.exact_range();
        for panel in &mut panels {
            if panel.curves.len() > 1 {
                panel.legend = Some(legend_corner(panel, &x)?);
            }
        }
        Ok(LineChart {
            title,
            x_label,
            x,
            panels,
        })
    }
}

/// Coordinates beyond ±10³⁰⁰ are skipped like infinite ones: plotters cannot lay out an axis
/// whose span overflows.
const LIMIT: f64 = 1e300;

/// Whether a coordinate can be drawn: finite and within ±[`LIMIT`] (false for NaN).
fn drawable(v: f64) -> bool {
    v.abs() <= LIMIT
}

/// The smallest and largest of some drawable values.
#[derive(Default)]
struct Bounds {
    lo: Option<f64>,
    hi: Option<f64>,
}

impl Bounds {
    fn add(&mut self, v: f64) {
        self.lo = Some(self.lo.map_or(v, |lo| lo.min(v)));
        self.hi = Some(self.hi.map_or(v, |hi| hi.max(v)));
    }

    /// From the smallest to the largest value; a single value ±0.5 (more for values so large
    /// that ±0.5 is below their precision); `0..1` for none.
    fn exact_range(&self) -> Range<f64> {
        let (Some(lo), Some(hi)) = (self.lo, self.hi) else {
            return 0.0..1.0;
        };
        if hi - lo > lo.abs().max(hi.abs()) * 1e-12 {
            lo..hi
        } else {
            let center = lo / 2.0 + hi / 2.0;
            let half = 0.5f64.max(center.abs() * 1e-9);
            center - half..center + half
        }
    }

    /// The values with 5% of their spread as room above and below.
    fn linear_range(&self) -> Range<f64> {
        let r = self.exact_range();
        let pad = (r.end - r.start) * 0.05;
        r.start - pad..r.end + pad
    }

    /// For a logarithmic axis: the values with 5% of their spread in decades as room above and
    /// below (a single value from its half to its double). `None` when a value is zero or
    /// negative, there are none, or they span too many decades (about 300) to draw.
    fn log_range(&self) -> Option<Range<f64>> {
        let (lo, hi) = (self.lo?, self.hi?);
        if lo <= 0.0 {
            return None;
        }
        let exact = if hi / lo > 1.0 + 1e-12 {
            lo..hi
        } else {
            lo / 2.0..hi * 2.0
        };
        let pad = 10f64.powf((exact.end / exact.start).log10() * 0.05);
        let padded = exact.start / pad..exact.end * pad;
        [padded, exact]
            .into_iter()
            .find(|r| r.start >= 1e-300 && r.end <= 1e301 && (r.end / r.start).is_finite())
    }
}

/// The points split into runs of consecutive points whose coordinates are both
/// [drawable](drawable).
fn finite_runs(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for &(x, y) in points {
        if drawable(x) && drawable(y) {
            run.push((x, y));
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// Ticks for a logarithmic axis over `r` (positive): the powers of ten in it (only those of
/// every second, third… exponent when there are more than 8), or, over a short range, 1-2-5
/// or 1…9 times them, never closer than an eighth of the axis so that the labels do not
/// overlap, or evenly spaced values when even those give fewer than 3 ticks.
fn log_ticks(r: &Range<f64>) -> Vec<f64> {
    let (lo, hi) = (r.start.log10(), r.end.log10());
    let (first, last) = (lo.floor() as i32, hi.ceil() as i32);
    let inside = |v: &f64| (r.start..=r.end).contains(v);
    let powers: Vec<i32> = (first..=last).filter(|&k| inside(&10f64.powi(k))).collect();
    if powers.len() >= 3 {
        let step = powers.len().div_ceil(8);
        return powers
            .iter()
            .filter(|&&k| k.rem_euclid(step as i32) == 0)
            .map(|&k| 10f64.powi(k))
            .collect();
    }
    let min_gap = (hi - lo) / 8.0;
    for mantissas in [
        &[1.0, 2.0, 5.0][..],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ] {
        let mut ticks: Vec<f64> = Vec::new();
        for k in first..=last {
            for m in mantissas {
                let v = m * 10f64.powi(k);
                if inside(&v)
                    && ticks
                        .last()
                        .is_none_or(|&t| v.log10() - t.log10() >= min_gap)
                {
                    ticks.push(v);
                }
            }
        }
        if ticks.len() >= 3 {
            return ticks;
        }
    }
    linear_ticks(r, 5)
}

/// About `n` evenly spaced round values (1, 2 or 5 times a power of ten apart) in `r`.
fn linear_ticks(r: &Range<f64>, n: usize) -> Vec<f64> {
    let raw = (r.end - r.start) / n as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (r.start / step).ceil();
    (0..=2 * n)
        .map(|i| (first + i as f64) * step)
        .take_while(|&v| v <= r.end)
        .collect()
}

/// The corner of the panel where the legend hides the least: the fewest points under it,
/// counting a marker's line (and, at the top, its label) as several points. Prefers the upper
/// right, then the lower right, upper left and lower left on a tie.
fn legend_corner(panel: &PanelPlan<'_>, x: &Range<f64>) -> Result<SeriesLabelPosition> {
    // The legend's size as a fraction of the plotting area (about 832 × 246 pixels).
    let font = FontDesc::new(FontFamily::SansSerif, LEGEND_PX, FontStyle::Normal);
    let widest = panel.curves.iter().try_fold(0u32, |w, c| {
        Ok::<_, Error>(w.max(font.box_size(&c.label).map_err(drawing_failed)?.0))
    })?;
    let plot_w = f64::from(WIDTH - 2 * MARGIN - Y_AXIS - RIGHT);
    let plot_h = f64::from(PANEL - GAP);
    let fx = ((f64::from(widest) + 50.0) / plot_w).min(1.0);
    let fy = ((panel.curves.len() as f64 * (LEGEND_PX + 6.0) + 20.0) / plot_h).min(1.0);

    let y_of = |v: f64| if panel.log_y { v.log10() } else { v };
    let (y0, y1) = (y_of(panel.y.start), y_of(panel.y.end));
    let nx = |v: f64| (v - x.start) / (x.end - x.start);
    let ny = |v: f64| (y_of(v) - y0) / (y1 - y0);
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let in_x = |right: bool, v: f64| if right { v >= 1.0 - fx } else { v <= fx };
    let in_y = |top: bool, v: f64| if top { v >= 1.0 - fy } else { v <= fy };
    let cost = |right: bool, top: bool| {
        let points = panel
            .curves
            .iter()
            .flat_map(|c| c.runs.iter().flatten())
            .filter(|&&(px, py)| in_x(right, nx(px)) && in_y(top, ny(py)))
            .count();
        let per_marker = if top { 12 } else { 4 };
        let markers = panel
            .markers
            .iter()
            .filter(|(mx, _)| in_x(right, nx(*mx)))
            .count();
        points + per_marker * markers
    };
    let best = corners
        .into_iter()
        .min_by_key(|(_, right, top)| cost(*right, *top))
        .map_or(SeriesLabelPosition::UpperRight, |(pos, _, _)| pos);
    Ok(best)
}

/// An axis tick: thousands separators and no trailing zeros (`0.5`, `1,000`), or scientific
/// notation for magnitudes below 0.001 or from 10⁹ up. `zero` is the magnitude below which a
/// tick is taken for rounding noise around 0.
fn tick(v: f64, zero: f64) -> String {
    let a = v.abs();
    if a <= zero {
        "0".to_string()
    } else if (1e-3..1e9).contains(&a) {
        tick_label(v)
    } else {
        format!("{v:.1e}")
    }
}

impl Figure for LineChart<'_> {
    fn size(&self) -> (u32, u32) {
        // At most MAX_PANELS panels, so this cannot overflow.
        let n = self.panels.len() as u32;
        (WIDTH, 2 * MARGIN + CAPTION + n * PANEL + AXIS)
    }

    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let inner = root.margin(MARGIN, MARGIN, MARGIN, MARGIN);
        let (head, body) = inner.split_vertically(CAPTION);
        let (head_w, head_h) = head.dim_in_pixel();
        let title_style = FontDesc::new(FontFamily::SansSerif, TITLE_PX, FontStyle::Normal)
            .color(&TEXT_COLOR)
            .pos(Pos::new(HPos::Center, VPos::Center));
        head.draw(&Text::new(
            self.title,
            (head_w as i32 / 2, head_h as i32 / 2),
            title_style,
        ))?;

        let n = self.panels.len();
        let breaks: Vec<u32> = (1..n as u32).map(|i| i * PANEL).collect();
        let areas = body.split_by_breakpoints(Vec::<u32>::new(), breaks);
        for (i, (area, panel)) in areas.iter().zip(&self.panels).enumerate() {
            let bottom = i + 1 == n;
            let x_label = if bottom { Some(self.x_label) } else { None };
            let y = panel.y.clone();
            if panel.log_y {
                let y = y.log_scale().with_key_points(panel.log_ticks.clone());
                draw_panel(area, panel, self.x.clone(), x_label, y)?;
            } else {
                draw_panel(area, panel, self.x.clone(), x_label, y)?;
            }
        }
        Ok(())
    }
}

/// Draws one panel on `area` with the y axis `y` (linear or logarithmic); the x axis' ticks
/// and name (`x_label`) only for the bottom panel.
fn draw_panel<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    panel: &PanelPlan<'_>,
    x: Range<f64>,
    x_label: Option<&str>,
    y: Y,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let axis_font = FontDesc::new(FontFamily::SansSerif, AXIS_PX, FontStyle::Normal);
    let (y_lo, y_hi) = (panel.y.start, panel.y.end);
    let mut builder = ChartBuilder::on(area);
    builder
        .margin_right(RIGHT)
        .y_label_area_size(Y_AXIS)
        .x_label_area_size(if x_label.is_some() { AXIS } else { 0 });
    if x_label.is_none() {
        builder.margin_bottom(GAP);
    }
    let mut chart = builder.build_cartesian_2d(x.clone(), y)?;

    let x_zero = x.start.abs().max(x.end.abs()) * 1e-12;
    // A logarithmic axis has no 0: its small ticks are real values.
    let y_zero = if panel.log_y {
        0.0
    } else {
        y_lo.abs().max(y_hi.abs()) * 1e-12
    };
    let x_fmt = |v: &f64| tick(*v, x_zero);
    let y_fmt = |v: &f64| tick(*v, y_zero);
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(8)
        .y_labels(6)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .y_desc(panel.y_label)
        .label_style(axis_font.color(&TEXT_COLOR))
        .axis_desc_style(axis_font.color(&TEXT_COLOR))
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID_COLOR);
    if let Some(name) = x_label {
        mesh.x_desc(name);
    }
    mesh.draw()?;

    // A frame, so that panels without an x axis below still end in a line.
    chart.draw_series(std::iter::once(Rectangle::new(
        [(x.start, y_lo), (x.end, y_hi)],
        MARKER_COLOR.stroke_width(1),
    )))?;

    // Markers under the curves: a dashed line, its label at the top (left of the line in the
    // right third of the chart, so that it stays inside).
    let marker_style =
        FontDesc::new(FontFamily::SansSerif, MARKER_PX, FontStyle::Normal).color(&MARKER_COLOR);
    let split = x.start + (x.end - x.start) * 2.0 / 3.0;
    for (i, (mx, label)) in panel.markers.iter().enumerate() {
        chart.draw_series(std::iter::once(DashedPathElement::new(
            vec![(*mx, y_lo), (*mx, y_hi)],
            6,
            4,
            MARKER_COLOR.stroke_width(1),
        )))?;
        let row = (i % MARKER_ROWS) as i32 * (MARKER_PX as i32 + 2) + 3;
        let (dx, h) = if *mx > split {
            (-4, HPos::Right)
        } else {
            (4, HPos::Left)
        };
        chart.draw_series(std::iter::once(
            EmptyElement::at((*mx, y_hi))
                + Text::new(
                    label.clone(),
                    (dx, row),
                    marker_style.clone().pos(Pos::new(h, VPos::Top)),
                ),
        ))?;
    }

    for curve in &panel.curves {
        let style = curve.color.stroke_width(2);
        let color = curve.color;
        chart
            .draw_series(
                curve
                    .runs
                    .iter()
                    .filter(|run| run.len() > 1)
                    .map(|run| PathElement::new(run.clone(), style)),
            )?
            .label(curve.label.as_str())
            .legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2))
            });
        chart.draw_series(
            curve
                .runs
                .iter()
                .filter(|run| run.len() == 1)
                .flatten()
                .map(|&p| Circle::new(p, 3, curve.color.filled())),
        )?;
    }
    if let Some(corner) = &panel.legend {
        chart
            .configure_series_labels()
            .position(corner.clone())
            .background_style(WHITE.mix(0.85))
            .border_style(GRID_COLOR)
            .label_font(
                FontDesc::new(FontFamily::SansSerif, LEGEND_PX, FontStyle::Normal)
                    .color(&TEXT_COLOR),
            )
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(label: &str, points: &[(f64, f64)]) -> Series {
        Series {
            label: label.into(),
            points: points.to_vec(),
        }
    }

    fn two_panels() -> Vec<Panel> {
        vec![
            Panel {
                y_label: "fitness".into(),
                series: vec![
                    series("mean fitness", &[(0.0, 0.1), (1.0, 0.4), (2.0, 0.6)]),
                    series("best fitness", &[(0.0, 0.3), (1.0, 0.7), (2.0, 0.9)]),
                ],
                markers: vec![Marker {
                    x: 1.0,
                    label: "set sigma 0.05".into(),
                }],
                log_y: false,
            },
            Panel {
                y_label: "sigma".into(),
                series: vec![series("sigma", &[(0.0, 0.1), (1.0, 0.05), (2.0, 0.05)])],
                markers: vec![],
                log_y: true,
            },
        ]
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "hyperfunc-runs-chart-{}-{name}",
            std::process::id()
        ))
    }

    #[test]
    fn svg_has_title_legend_and_marker_labels() {
        let svg = line_chart_svg("xor run 7", "generation", &two_panels()).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("xor run 7"));
        assert!(svg.contains("mean fitness") && svg.contains("best fitness"));
        assert!(svg.contains("set sigma 0.05"));
        assert!(svg.contains("generation") && svg.contains("fitness"));
        // The canvas: 960 wide, about 260 per panel.
        assert!(svg.contains(r#"width="960""#));
        let (_, h) = LineChart::new("t", "x", &two_panels()).unwrap().size();
        assert!((2 * 260..=3 * 260).contains(&h), "height {h}");
    }

    #[test]
    fn long_marker_labels_are_clipped() {
        let mut panels = two_panels();
        panels[0].markers[0].label = format!("resumed {}", "x".repeat(60));
        let svg = line_chart_svg("t", "g", &panels).unwrap();
        let clipped = clip_label(&panels[0].markers[0].label);
        assert_eq!(clipped.chars().count(), 40);
        assert!(svg.contains(&clipped));
        assert!(!svg.contains(&"x".repeat(40)));
    }

    #[test]
    fn png_file_starts_with_the_magic() {
        let path = temp("curves.PNG");
        line_chart(&path, "Curves", "generation", &two_panels()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    }

    #[test]
    fn svg_file_is_written() {
        let path = temp("curves.svg");
        line_chart(&path, "Curves", "generation", &two_panels()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("Curves"));
    }

    #[test]
    fn other_extensions_are_refused() {
        for name in ["curves.jpg", "curves"] {
            let path = temp(name);
            let err = line_chart(&path, "t", "x", &two_panels()).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidConfig { field, .. } if field == "chart path"),
                "{err}"
            );
            assert!(!path.exists());
        }
    }

    #[test]
    fn no_panels_is_an_error() {
        let err = line_chart_svg("t", "x", &[]).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "chart panels"),
            "{err}"
        );
        let path = temp("none.svg");
        assert!(line_chart(&path, "t", "x", &[]).is_err());
        assert!(!path.exists());
        let many = vec![Panel::default(); MAX_PANELS + 1];
        assert!(line_chart_svg("t", "x", &many).is_err());
    }

    #[test]
    fn non_finite_points_leave_gaps() {
        let points = [
            (0.0, 1.0),
            (1.0, f64::NAN),
            (2.0, 3.0),
            (f64::INFINITY, 2.0),
            (4.0, 0.5),
            (5.0, f64::NEG_INFINITY),
        ];
        let panels = vec![Panel {
            y_label: "loss".into(),
            series: vec![series("loss", &points)],
            markers: vec![Marker {
                x: f64::NAN,
                label: "nowhere".into(),
            }],
            log_y: true,
        }];
        let svg = line_chart_svg("gaps", "generation", &panels).unwrap();
        assert!(svg.contains("gaps") && !svg.contains("nowhere"));
        assert_eq!(
            finite_runs(&points),
            vec![vec![(0.0, 1.0)], vec![(2.0, 3.0)], vec![(4.0, 0.5)]]
        );
        let path = temp("gaps.png");
        line_chart(&path, "gaps", "generation", &panels).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn empty_panels_keep_their_label() {
        let panels = vec![
            Panel {
                y_label: "nothing yet".into(),
                series: vec![series("a", &[(f64::NAN, f64::NAN)]), series("b", &[])],
                markers: vec![],
                log_y: true,
            },
            Panel {
                y_label: "cost".into(),
                ..Panel::default()
            },
        ];
        let svg = line_chart_svg("empty", "generation", &panels).unwrap();
        assert!(svg.contains("nothing yet") && svg.contains("cost"));
        let chart = LineChart::new("empty", "g", &panels).unwrap();
        assert_eq!(chart.x, 0.0..1.0);
        assert!(!chart.panels[0].log_y);
    }

    #[test]
    fn ranges() {
        // A single x widens by ±0.5; markers count for the x axis.
        let panels = vec![Panel {
            y_label: "y".into(),
            series: vec![series("s", &[(3.0, 2.0)])],
            markers: vec![],
            log_y: false,
        }];
        let chart = LineChart::new("t", "x", &panels).unwrap();
        assert_eq!(chart.x, 2.5..3.5);
        let mut with_marker = panels.clone();
        with_marker[0].markers.push(Marker {
            x: 10.0,
            label: "m".into(),
        });
        assert_eq!(LineChart::new("t", "x", &with_marker).unwrap().x, 3.0..10.0);
        // log_y with a non-positive value falls back to linear.
        let mixed = vec![Panel {
            y_label: "y".into(),
            series: vec![series("s", &[(0.0, -1.0), (1.0, 10.0)])],
            markers: vec![],
            log_y: true,
        }];
        let chart = LineChart::new("t", "x", &mixed).unwrap();
        assert!(!chart.panels[0].log_y);
        assert!(chart.panels[0].y.start < -1.0 && chart.panels[0].y.end > 10.0);
        line_chart_svg("t", "x", &mixed).unwrap();
    }

    #[test]
    fn extreme_values_draw() {
        // Each of these once sent plotters' tick search into a (practically) endless loop.
        let max = f64::MAX;
        let cases: [(f64, f64, f64, f64); 9] = [
            (-1e300, 1e300, 1e-300, 1e300),
            (-max, max, 1.0, 2.0),
            (0.0, 1.0, -max, max),
            (max, max, 5e-324, 5e-324),
            (0.0, 1.0, 1e-300, 1e7),
            (0.0, 1.0, 1e-150, 1e150),
            (0.0, 1e-13, 1.0, 1.0 + 1e-15),
            (1e300, 1e300, 1e300, 1e300),
            (0.0, 1.0, 1e-320, 1e-300),
        ];
        for (x0, x1, y0, y1) in cases {
            for log_y in [false, true] {
                let panels = vec![Panel {
                    y_label: "y".into(),
                    series: vec![series("s", &[(x0, y0), (x1, y1)])],
                    markers: vec![Marker {
                        x: x1,
                        label: "m".into(),
                    }],
                    log_y,
                }];
                let chart = LineChart::new("t", "x", &panels).unwrap();
                for r in std::iter::once(&chart.x).chain(chart.panels.iter().map(|p| &p.y)) {
                    assert!(r.start < r.end && (r.end - r.start).is_finite(), "{r:?}");
                }
                line_chart_svg("t", "x", &panels).unwrap();
            }
        }
    }

    #[test]
    fn log_ticks_are_round_and_apart() {
        assert_eq!(
            log_ticks(&(0.0009..11.0)),
            vec![0.001, 0.01, 0.1, 1.0, 10.0]
        );
        // Many decades: every third power, at most 8 ticks.
        assert_eq!(
            log_ticks(&(1e-9..1e9)),
            vec![1e-9, 1e-6, 1e-3, 1.0, 1e3, 1e6, 1e9]
        );
        assert!(log_ticks(&(1e-300..1e300)).len() <= 8);
        assert_eq!(log_ticks(&(0.018..0.11)), vec![0.02, 0.05, 0.1]);
        let narrow = log_ticks(&(0.041..0.049));
        assert!(narrow.len() >= 3, "{narrow:?}");
        for ticks in [narrow, log_ticks(&(0.3..0.95))] {
            assert!(ticks.windows(2).all(|w| w[0] < w[1]), "{ticks:?}");
        }
        assert_eq!(
            linear_ticks(&(0.0..1.0), 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
    }

    #[test]
    fn legend_avoids_the_curves() {
        // Rising curves fill the upper right; falling ones the upper left.
        let rising: Vec<(f64, f64)> = (0..50).map(|i| (f64::from(i), f64::from(i))).collect();
        let falling: Vec<(f64, f64)> = rising.iter().map(|&(x, y)| (x, 49.0 - y)).collect();
        for (points, forbidden) in [
            (&rising, SeriesLabelPosition::UpperRight),
            (&falling, SeriesLabelPosition::UpperLeft),
        ] {
            let panels = vec![Panel {
                y_label: "y".into(),
                series: vec![series("a", points), series("b", points)],
                ..Panel::default()
            }];
            let chart = LineChart::new("t", "x", &panels).unwrap();
            let corner = chart.panels[0].legend.clone().unwrap();
            assert_ne!(corner, forbidden);
        }
        // No legend for a single curve.
        let one = vec![Panel {
            series: vec![series("a", &rising)],
            ..Panel::default()
        }];
        assert!(LineChart::new("t", "x", &one).unwrap().panels[0]
            .legend
            .is_none());
    }

    #[test]
    fn ticks_are_readable() {
        assert_eq!(tick(0.5, 0.0), "0.5");
        assert_eq!(tick(1000.0, 0.0), "1,000");
        assert_eq!(tick(1e-17, 1e-12), "0");
        assert_eq!(tick(0.0001, 0.0), "1.0e-4");
        assert_eq!(tick(2.5e10, 0.0), "2.5e10");
    }
}
