//! Reading an LLM judge's reply (no LLM needed: usable on any text).

use std::sync::OnceLock;

use regex::Regex;

/// How a score was found: `true` for a labelled line (`SCORE: 7`, a lone `7`), whose text is
/// cut from the feedback; `false` for a score inside prose, which stays.
struct Pattern {
    re: Regex,
    labelled: bool,
}

fn patterns() -> &'static [Pattern] {
    static P: OnceLock<Vec<Pattern>> = OnceLock::new();
    P.get_or_init(|| {
        const N: &str = r"([-+]?\d+(?:\.\d+)?)";
        let p = |re: String, labelled| Pattern {
            re: Regex::new(&re).expect("the judgement patterns are valid constants"),
            labelled,
        };
        vec![
            // The asked-for format.
            p(format!(r"(?mR)^[ \t]*SCORE:[ \t]*{N}"), true),
            // `Score: 7/10`, `**Score:** 7`, `Rating = 7` in any case.
            p(
                format!(
                    r"(?i)\b(?:score|rating)[ \t*_]*[:=][ \t*_]*{N}(?:[ \t]*/[ \t]*\d+(?:\.\d+)?)?"
                ),
                true,
            ),
            // `a score of 7`, `rating of 7`.
            p(format!(r"(?i)\b(?:score|rating)[ \t]+of[ \t]+{N}"), false),
            // `7/10` anywhere.
            p(format!(r"{N}[ \t]*/[ \t]*\d+(?:\.\d+)?"), false),
            // A number alone on its line.
            p(format!(r"(?mR)^[ \t*_]*{N}[ \t*_.]*$"), true),
        ]
    })
}

/// Reads a judge's reply: the score normalised to `[0, 1]` and the feedback.
///
/// The score is the first match of, in order: a `SCORE: <n>` line; `Score: 7/10`,
/// `**Score:** 7` or `Rating: 7` (any case); `score of 7`; `7/10` anywhere; a number alone on
/// its line. It is clamped to `[min, max]` and normalised as `(x − min) / (max − min)`; a
/// denominator such as the `10` of `7/10` is ignored (the judge's own scale counts).
///
/// The feedback is everything after `FEEDBACK:` (any case, to the end of the text, several
/// lines allowed); without that label it is the reply with the score line removed (a score in
/// prose, like `I'd rate this 4/5`, leaves the text whole). `None` when no score is found or
/// `max <= min`.
///
/// # Examples
/// ```
/// use hyperfunc::eval::parse_judgement;
/// let (s, fb) = parse_judgement("SCORE: 8\nFEEDBACK: Accurate and concise.", 1.0, 10.0).unwrap();
/// assert!((s - 7.0 / 9.0).abs() < 1e-6);
/// assert_eq!(fb, "Accurate and concise.");
/// assert_eq!(parse_judgement("**Score:** 5", 1.0, 5.0).unwrap().0, 1.0);
/// assert!(parse_judgement("looks fine to me", 1.0, 10.0).is_none());
/// ```
pub fn parse_judgement(text: &str, min: f32, max: f32) -> Option<(f32, String)> {
    if max.is_nan() || min.is_nan() || max <= min {
        return None;
    }
    let (caps, labelled) = patterns()
        .iter()
        .find_map(|p| p.re.captures(text).map(|c| (c, p.labelled)))?;
    let raw: f32 = caps.get(1)?.as_str().parse().ok()?;
    if !raw.is_finite() {
        return None;
    }
    let score = (raw.clamp(min, max) - min) / (max - min);
    let rest = if labelled {
        let whole = caps.get(0)?;
        let mut t = String::with_capacity(text.len());
        t.push_str(&text[..whole.start()]);
        t.push_str(&text[whole.end()..]);
        t
    } else {
        text.to_string()
    };
    static FEEDBACK: OnceLock<Regex> = OnceLock::new();
    let fb_re = FEEDBACK.get_or_init(|| {
        Regex::new(r"(?is)\bfeedback[ \t*_]*:[ \t*_]*(.*)")
            .expect("the feedback pattern is a valid constant")
    });
    let feedback = match fb_re.captures(&rest).and_then(|c| c.get(1)) {
        Some(m) => m
            .as_str()
            .trim_end_matches(|c: char| c.is_whitespace() || c == '*' || c == '_')
            .trim()
            .to_string(),
        None => rest
            .lines()
            .map(|l| l.trim_start_matches(|c: char| c.is_whitespace() || "*_:.,;".contains(c)))
            .map(|l| l.trim_end_matches(|c: char| c.is_whitespace() || c == '*' || c == '_'))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    Some((score, feedback))
}
