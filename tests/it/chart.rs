//! `hyperfunc::tune::chart`: bar charts written as SVG and PNG, and the typed errors for a bad
//! extension, bad values or no bars (with no file left behind).
#![cfg(feature = "plot")]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyperfunc::tune::chart::{bar_chart, bar_chart_svg, Bar};
use hyperfunc::Error;

/// A file path in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(ext: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        Self(std::env::temp_dir().join(format!(
            "hyperfunc-chart-{}-{}.{ext}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bars() -> Vec<Bar> {
    vec![
        Bar::new("gpt-large <reasoning>", 1234.5),
        Bar::new("gpt-small", 42.0),
        Bar::new("cache & retry", 0.0125),
        Bar::new("zero", 0.0),
    ]
}

fn assert_invalid(err: Error, field: &str, reason_has: &str) {
    match err {
        Error::InvalidConfig { field: f, reason } => {
            assert_eq!(f, field);
            assert!(reason.contains(reason_has), "reason: {reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn svg_file_has_title_labels_and_values() {
    let file = TempFile::new("svg");
    bar_chart(&file.0, "Cost per model", "USD", &bars()).unwrap();
    let svg = std::fs::read_to_string(&file.0).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("Cost per model"));
    assert!(svg.contains("USD"));
    // Labels are XML-escaped.
    assert!(svg.contains("gpt-large &lt;reasoning&gt;"));
    assert!(svg.contains("cache &amp; retry"));
    for text in ["gpt-small", "zero", "1,234.50", "42", "0.0125"] {
        assert!(svg.contains(text), "missing {text}");
    }
    // The string form is the same document.
    assert_eq!(
        bar_chart_svg("Cost per model", "USD", &bars()).unwrap(),
        svg
    );
}

#[test]
fn long_labels_are_clipped_with_an_ellipsis() {
    let long = "a-very-long-label-".repeat(5);
    let svg = bar_chart_svg("Calls", "calls", &[Bar::new(long.clone(), 3.0)]).unwrap();
    let clipped: String = long.chars().take(39).chain(['…']).collect();
    assert!(svg.contains(&clipped));
    assert!(!svg.contains(&long));
}

#[test]
fn png_file_is_a_png_of_the_chart_size() {
    let file = TempFile::new("PNG");
    bar_chart(&file.0, "Calls per label", "calls", &bars()).unwrap();
    let png = std::fs::read(&file.0).unwrap();
    assert!(png.len() > 1000, "{} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: width and height, big endian, right after the chunk length and type.
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width >= 400, "width {width}");
    assert!(height >= 4 * 20, "height {height}");
    // More bars make a taller chart.
    let more = TempFile::new("png");
    let many: Vec<Bar> = (0..20)
        .map(|i| Bar::new(format!("b{i}"), i as f64))
        .collect();
    bar_chart(&more.0, "Many", "", &many).unwrap();
    let png2 = std::fs::read(&more.0).unwrap();
    assert!(u32::from_be_bytes(png2[20..24].try_into().unwrap()) > height);
}

#[test]
fn bad_extension_is_a_typed_error_and_writes_nothing() {
    for ext in ["jpg", "txt"] {
        let file = TempFile::new(ext);
        let err = bar_chart(&file.0, "t", "USD", &bars()).unwrap_err();
        assert_invalid(err, "chart path", ".svg` or `.png");
        assert!(!file.0.exists());
    }
    let no_ext = TempFile::new("x");
    let path = no_ext.0.with_extension("");
    assert_invalid(
        bar_chart(&path, "t", "USD", &bars()).unwrap_err(),
        "chart path",
        ".svg",
    );
    assert!(!path.exists());
}

#[test]
fn bad_values_and_empty_lists_are_typed_errors_and_write_nothing() {
    for (bad, what) in [(f64::NAN, "NaN"), (-1.0, "-1"), (f64::INFINITY, "inf")] {
        let file = TempFile::new("svg");
        let mut b = bars();
        b[1].value = bad;
        let err = bar_chart(&file.0, "t", "USD", &b).unwrap_err();
        assert_invalid(err, "chart bars", what);
        assert!(!file.0.exists());
        assert!(matches!(
            bar_chart_svg("t", "USD", &b),
            Err(Error::InvalidConfig { .. })
        ));
    }
    for ext in ["svg", "png"] {
        let file = TempFile::new(ext);
        let err = bar_chart(&file.0, "t", "USD", &[]).unwrap_err();
        assert_invalid(err, "chart bars", "empty");
        assert!(!file.0.exists());
    }
}

#[test]
fn unwritable_path_is_a_file_error() {
    let dir = TempFile::new("d");
    let path = dir.0.join("missing-dir").join("chart.svg");
    match bar_chart(&path, "t", "USD", &bars()) {
        Err(Error::File { path: p, .. }) => assert!(p.ends_with("chart.svg")),
        other => panic!("expected Error::File, got {other:?}"),
    }
}
