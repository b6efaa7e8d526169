//! Horizontal bar charts (SVG or PNG) for cost and run reports.
//!
//! One bar per [`Bar`], drawn top to bottom in the order given (sort largest first before
//! calling), with its label on the left, its value at the end of the bar, the title on top and
//! the value axis (named by `unit`) below. Labels longer than 40 characters are clipped with an
//! ellipsis.
//!
//! Text never depends on the machine: widths are measured, and PNG glyphs rasterised, with
//! Noto Sans Regular compiled into the binary (registered with plotters as `sans-serif` unless
//! the application registered its own). An SVG names the `sans-serif` family, so a browser
//! draws it with its own sans-serif font. Glyphs that Noto Sans lacks (CJK, emoji) show as
//! boxes in a PNG.
//!
//! This module draws what it is given; it knows nothing of where the numbers come from.
//!
//! # Examples
//! ```
//! use hyperfunc::tune::chart::{bar_chart, Bar};
//!
//! let bars = vec![
//!     Bar { label: "gpt-large".into(), value: 12.5 },
//!     Bar { label: "gpt-small".into(), value: 1.75 },
//! ];
//! let path = std::env::temp_dir().join(format!("hyperfunc-doc-chart-{}.svg", std::process::id()));
//! bar_chart(&path, "Cost per model", "USD", &bars)?;
//! let svg = std::fs::read_to_string(&path).unwrap();
//! assert!(svg.starts_with("<svg") && svg.contains("gpt-large"));
//! # std::fs::remove_file(&path).unwrap();
//! # Ok::<(), hyperfunc::Error>(())
//! ```

use std::fmt::Display;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};

/// Canvas width, pixels.
const WIDTH: u32 = 960;
/// Height of one bar's row, pixels.
const ROW: u32 = 28;
/// Blank border around the chart, pixels.
const MARGIN: u32 = 16;
/// Room for the title, pixels.
const CAPTION: u32 = 44;
/// Room for the value axis (ticks and unit), pixels.
const AXIS: u32 = 48;
/// Gap between a bar's end and its value, and between a label and the axis, pixels.
const GAP: u32 = 8;
/// Labels longer than this many characters are clipped with an ellipsis.
const MAX_LABEL_CHARS: usize = 40;
/// More bars than this is an error: the chart would be unreadable (and a PNG huge).
const MAX_BARS: usize = 1000;

const TITLE_PX: f64 = 24.0;
const LABEL_PX: f64 = 15.0;
const VALUE_PX: f64 = 14.0;
const AXIS_PX: f64 = 14.0;

const BAR_COLOR: RGBColor = RGBColor(66, 120, 200);
const TEXT_COLOR: RGBColor = RGBColor(33, 33, 33);
const VALUE_COLOR: RGBColor = RGBColor(70, 70, 70);

/// One bar: its label and its value (a finite number, not negative: dollars, counts…).
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    /// Shown left of the bar; clipped to 40 characters.
    pub label: String,
    /// The bar's length, shown at its end.
    pub value: f64,
}

impl Bar {
    /// A bar with this label and value.
    pub fn new(label: impl Into<String>, value: f64) -> Self {
        Bar {
            label: label.into(),
            value,
        }
    }
}

/// Writes a horizontal bar chart of `bars` (drawn top to bottom in the order given) to `path`.
///
/// The format follows the extension, `.svg` or `.png` (either case). `unit` names the value
/// axis (`"USD"`, `"calls"`); it may be empty.
///
/// # Errors
/// [`Error::InvalidConfig`] for another extension, an empty list, more than 1000 bars or a
/// value that is NaN, infinite or negative — nothing is written then; [`Error::File`] when
/// the file cannot be written.
///
/// # Examples
/// ```
/// use hyperfunc::tune::chart::{bar_chart, Bar};
///
/// let path = std::env::temp_dir().join(format!("hyperfunc-doc-calls-{}.png", std::process::id()));
/// bar_chart(&path, "Calls", "calls", &[Bar::new("classify", 1200.0), Bar::new("judge", 80.0)])?;
/// assert!(std::fs::metadata(&path).unwrap().len() > 0);
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub fn bar_chart(path: impl AsRef<Path>, title: &str, unit: &str, bars: &[Bar]) -> Result<()> {
    let path = path.as_ref();
    let format = Format::of(path)?;
    let chart = BarChart {
        layout: Layout::new(bars)?,
        title,
        unit,
    };
    write_figure(path, format, &chart)
}

/// The same chart as [`bar_chart`], as an SVG document.
///
/// # Errors
/// [`Error::InvalidConfig`] for an empty list, more than 1000 bars or a value that is NaN,
/// infinite or negative.
///
/// # Examples
/// ```
/// use hyperfunc::tune::chart::{bar_chart_svg, Bar};
///
/// let svg = bar_chart_svg("Errors", "calls", &[Bar::new("timeout", 3.0)])?;
/// assert!(svg.starts_with("<svg") && svg.contains("timeout"));
/// # Ok::<(), hyperfunc::Error>(())
/// ```
pub fn bar_chart_svg(title: &str, unit: &str, bars: &[Bar]) -> Result<String> {
    render_svg(&BarChart {
        layout: Layout::new(bars)?,
        title,
        unit,
    })
}

/// A chart's file format, picked by the extension of the path it is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// `.svg`: an SVG document.
    Svg,
    /// `.png`: an RGB PNG image.
    Png,
}

impl Format {
    /// The format named by `path`'s extension, `.svg` or `.png` (either case).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (`chart path`) for any other extension, or none.
    pub(crate) fn of(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(Error::config(
                "chart path",
                format!(
                    "`{}` must end in `.svg` or `.png` (the extension picks the format)",
                    path.display()
                ),
            )),
        }
    }
}

/// What drawing on a plotters backend returns.
pub(crate) type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A chart that draws itself on any plotters backend, so that one drawing routine gives both
/// the SVG and the PNG. Text uses [`FontFamily::SansSerif`]; call [`ensure_font`] before
/// measuring any text (the renderers below call it too).
pub(crate) trait Figure {
    /// The canvas, pixels: (width, height).
    fn size(&self) -> (u32, u32);
    /// Draws the whole chart on `root` (which is not filled yet).
    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// `figure` rendered as `format` and written to `path`.
///
/// # Errors
/// A drawing failure as [`Error::InvalidConfig`] (`chart`); [`Error::File`] when the file
/// cannot be written.
pub(crate) fn write_figure(path: &Path, format: Format, figure: &impl Figure) -> Result<()> {
    let bytes = match format {
        Format::Svg => render_svg(figure)?.into_bytes(),
        Format::Png => render_png(figure)?,
    };
    std::fs::write(path, bytes).map_err(|source| Error::File {
        path: path.display().to_string(),
        source,
    })
}

/// `figure` as an SVG document.
pub(crate) fn render_svg(figure: &impl Figure) -> Result<String> {
    ensure_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, figure.size()).into_drawing_area();
        figure.draw_on(&root).map_err(drawing_failed)?;
        root.present().map_err(drawing_failed)?;
    }
    Ok(svg)
}

/// `figure` as PNG bytes (RGB, 8 bits).
pub(crate) fn render_png(figure: &impl Figure) -> Result<Vec<u8>> {
    ensure_font()?;
    let (w, h) = figure.size();
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        figure.draw_on(&root).map_err(drawing_failed)?;
        root.present().map_err(drawing_failed)?;
    }
    let mut png_bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut png_bytes, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(drawing_failed)?;
    writer.write_image_data(&rgb).map_err(drawing_failed)?;
    writer.finish().map_err(drawing_failed)?;
    Ok(png_bytes)
}

/// A failure inside plotters or the PNG encoder: not the caller's input, but reported as a
/// chart error rather than a panic.
pub(crate) fn drawing_failed(e: impl Display) -> Error {
    Error::config("chart", format!("drawing the chart failed: {e}"))
}

/// A validated bar chart with its texts.
struct BarChart<'a> {
    layout: Layout,
    title: &'a str,
    unit: &'a str,
}

impl Figure for BarChart<'_> {
    fn size(&self) -> (u32, u32) {
        (WIDTH, self.layout.height)
    }

    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        draw(root, &self.layout, self.title, self.unit)
    }
}

/// Everything measured before drawing: validated bars, clipped labels, sizes.
struct Layout {
    height: u32,
    /// Width of the label column left of the bars, pixels.
    label_area: u32,
    /// The value axis' end: room for the widest value text right of the longest bar.
    x_max: f64,
    labels: Vec<String>,
    values: Vec<f64>,
    value_texts: Vec<String>,
}

impl Layout {
    fn new(bars: &[Bar]) -> Result<Self> {
        if bars.is_empty() {
            return Err(Error::config("chart bars", "the list of bars is empty"));
        }
        if bars.len() > MAX_BARS {
            return Err(Error::config(
                "chart bars",
                format!("{} bars; at most {MAX_BARS} fit a chart", bars.len()),
            ));
        }
        if let Some(b) = bars
            .iter()
            .find(|b| !(b.value.is_finite() && b.value >= 0.0))
        {
            return Err(Error::config(
                "chart bars",
                format!(
                    "bar `{}` has value {}; values must be finite and not negative",
                    b.label, b.value
                ),
            ));
        }
        ensure_font()?;
        let labels: Vec<String> = bars.iter().map(|b| clip_label(&b.label)).collect();
        let values: Vec<f64> = bars.iter().map(|b| b.value).collect();
        let value_texts: Vec<String> = values.iter().map(|&v| format_value(v)).collect();

        let label_font = FontDesc::new(FontFamily::SansSerif, LABEL_PX, FontStyle::Normal);
        let value_font = FontDesc::new(FontFamily::SansSerif, VALUE_PX, FontStyle::Normal);
        let widest = |font: &FontDesc, texts: &[String]| -> Result<u32> {
            texts.iter().try_fold(0, |w, t| {
                Ok(w.max(font.box_size(t).map_err(drawing_failed)?.0))
            })
        };
        let label_area = widest(&label_font, &labels)?.min(WIDTH / 2) + 2 * GAP;
        let value_width = widest(&value_font, &value_texts)? + 2 * GAP;

        let plot_width = f64::from(WIDTH - 2 * MARGIN - label_area);
        let max = values.iter().copied().fold(0.0, f64::max);
        let x_max = if max > 0.0 {
            // The longest bar ends where its value text still fits inside the plot.
            let room = (plot_width - f64::from(value_width)).max(plot_width / 3.0);
            max * plot_width / room
        } else {
            1.0
        };
        let n = u32::try_from(bars.len()).expect("at most MAX_BARS bars");
        Ok(Layout {
            height: 2 * MARGIN + CAPTION + n * ROW + AXIS,
            label_area,
            x_max,
            labels,
            values,
            value_texts,
        })
    }
}

/// Draws the whole chart on `root`.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    layout: &Layout,
    title: &str,
    unit: &str,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let n = layout.values.len();
    let axis_font = FontDesc::new(FontFamily::SansSerif, AXIS_PX, FontStyle::Normal);
    let mut chart = ChartBuilder::on(root)
        .margin(MARGIN)
        .caption(
            title,
            FontDesc::new(FontFamily::SansSerif, TITLE_PX, FontStyle::Normal).color(&TEXT_COLOR),
        )
        .x_label_area_size(AXIS)
        .y_label_area_size(layout.label_area)
        .build_cartesian_2d(0.0..layout.x_max, 0.0..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(6)
        .x_label_formatter(&|v| tick_label(*v))
        .x_desc(unit)
        .label_style(axis_font.color(&TEXT_COLOR))
        .axis_desc_style(axis_font.color(&TEXT_COLOR))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;

    // Row `i` (the i-th bar) sits at the top for i = 0.
    let row_center = |i: usize| (n - i) as f64 - 0.5;
    chart.draw_series(layout.values.iter().enumerate().map(|(i, &v)| {
        let y = row_center(i);
        Rectangle::new([(0.0, y - 0.35), (v, y + 0.35)], BAR_COLOR.filled())
    }))?;
    let value_style = FontDesc::new(FontFamily::SansSerif, VALUE_PX, FontStyle::Normal)
        .color(&VALUE_COLOR)
        .pos(Pos::new(HPos::Left, VPos::Center));
    chart.draw_series(
        layout
            .value_texts
            .iter()
            .zip(&layout.values)
            .enumerate()
            .map(|(i, (text, &v))| {
                EmptyElement::at((v, row_center(i)))
                    + Text::new(text.clone(), (GAP as i32, 0), value_style.clone())
            }),
    )?;

    // Labels go left of the plotting area, so they are placed on the root in pixels.
    let label_style = FontDesc::new(FontFamily::SansSerif, LABEL_PX, FontStyle::Normal)
        .color(&TEXT_COLOR)
        .pos(Pos::new(HPos::Right, VPos::Center));
    for (i, label) in layout.labels.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, row_center(i)));
        root.draw(&Text::new(
            label.as_str(),
            (x - GAP as i32, y),
            label_style.clone(),
        ))?;
    }
    Ok(())
}

/// Registers the bundled Noto Sans as plotters' `sans-serif` once per process, unless the
/// application registered a `sans-serif` font of its own.
pub(crate) fn ensure_font() -> Result<()> {
    static READY: OnceLock<bool> = OnceLock::new();
    let ready = *READY.get_or_init(|| {
        let have = || {
            FontDesc::new(FontFamily::SansSerif, LABEL_PX, FontStyle::Normal)
                .box_size("x")
                .is_ok()
        };
        have()
            || (plotters::style::register_font(
                FontFamily::SansSerif.as_str(),
                FontStyle::Normal,
                ttf_noto_sans::REGULAR,
            )
            .is_ok()
                && have())
    });
    if ready {
        Ok(())
    } else {
        Err(drawing_failed("the bundled font could not be loaded"))
    }
}

/// The label with control characters as spaces, clipped to [`MAX_LABEL_CHARS`] with `…`.
pub(crate) fn clip_label(label: &str) -> String {
    let clean = label.chars().map(|c| if c.is_control() { ' ' } else { c });
    if label.chars().count() > MAX_LABEL_CHARS {
        clean
            .take(MAX_LABEL_CHARS - 1)
            .chain(std::iter::once('…'))
            .collect()
    } else {
        clean.collect()
    }
}

/// A bar's value: whole numbers with thousands separators (`12,345`), others with two
/// decimals from 1 up (`12.35`) and three significant digits below 1 (`0.00123`).
fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        group_thousands(&format!("{v:.0}"))
    } else if v.abs() >= 1.0 {
        let s = format!("{v:.2}");
        match s.split_once('.') {
            Some((int, frac)) => format!("{}.{frac}", group_thousands(int)),
            None => s,
        }
    } else {
        // Three significant digits; at most 12 decimals (smaller values print as 0.000…).
        let decimals = (2 - v.abs().log10().floor() as i32).clamp(3, 12) as usize;
        format!("{v:.decimals$}")
    }
}

/// An axis tick: like [`format_value`] without trailing zeros (`0.5`, `1.25`, `1,000`).
pub(crate) fn tick_label(v: f64) -> String {
    let s = format_value(v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `1234567` → `1,234,567` (digits only, with an optional leading `-`).
fn group_thousands(int: &str) -> String {
    let (sign, digits) = match int.strip_prefix('-') {
        Some(d) => ("-", d),
        None => ("", int),
    };
    let mut out = String::with_capacity(int.len() + int.len() / 3);
    out.push_str(sign);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_readable() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(12345.0), "12,345");
        assert_eq!(format_value(1234.567), "1,234.57");
        assert_eq!(format_value(0.5), "0.500");
        assert_eq!(format_value(0.00123), "0.00123");
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(1000.0), "1,000");
        assert_eq!(group_thousands("100"), "100");
        assert_eq!(group_thousands("1000000"), "1,000,000");
    }

    #[test]
    fn long_labels_are_clipped() {
        let long = "x".repeat(60);
        let clipped = clip_label(&long);
        assert_eq!(clipped.chars().count(), MAX_LABEL_CHARS);
        assert!(clipped.ends_with('…'));
        assert_eq!(clip_label("a\nb"), "a b");
    }
}
