//! Reading a model's reply into the output fields of a signature, tolerantly.
//!
//! In order: the whole reply as a JSON object; each fenced code block; each balanced `{…}` in the
//! text (so prose around JSON is fine); then `name: value` lines (markdown bold and list markers
//! allowed, values may run over several lines). A signature with one text output takes the whole
//! reply when nothing else matches. Values are converted to their field's type.

use serde_json::Map;

use super::signature::{Field, FieldType};
use crate::function::Json;

/// Why a reply could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseFailure {
    /// What was missing or malformed, naming the fields.
    pub message: String,
}

/// Parses `text` into an object with exactly the `outputs` fields.
///
/// # Examples
/// ```
/// use hyperfunc::prompt::{parse_fields, Signature, FieldType};
/// let sig = Signature::new("t").output("answer", "").output_typed("confidence", "", FieldType::Number);
/// let reply = "Sure! Here it is:\n```json\n{\"answer\": \"Paris\", \"confidence\": \"0.9\"}\n```";
/// let out = parse_fields(reply, sig.outputs())?;
/// assert_eq!(out["answer"], "Paris");
/// assert_eq!(out["confidence"], 0.9);
/// let lines = parse_fields("**Answer:** Paris\nConfidence: 0.8", sig.outputs())?;
/// assert_eq!(lines["confidence"], 0.8);
/// assert!(parse_fields("I don't know.", sig.outputs()).is_err());
/// # Ok::<(), hyperfunc::prompt::ParseFailure>(())
/// ```
pub fn parse_fields(text: &str, outputs: &[Field]) -> Result<Json, ParseFailure> {
    let mut best: Option<(usize, Map<String, Json>)> = None;
    for obj in json_objects(text) {
        let found = pick(&obj, outputs);
        let n = found.len();
        if n == outputs.len() {
            return convert(found, outputs);
        }
        if n > 0 && best.as_ref().is_none_or(|(m, _)| n > *m) {
            best = Some((n, found));
        }
    }
    let lines = labelled_lines(text, outputs);
    if lines.len() == outputs.len() {
        return convert(lines, outputs);
    }
    if let [only] = outputs {
        if only.ty == FieldType::Text && best.is_none() && lines.is_empty() {
            let body = strip_fence(text.trim()).trim();
            if !body.is_empty() {
                let mut m = Map::new();
                m.insert(only.name.clone(), Json::String(body.to_string()));
                return convert(m, outputs);
            }
        }
    }
    let found = match best {
        Some((n, m)) if n >= lines.len() => m,
        _ => lines,
    };
    let missing: Vec<&str> = outputs
        .iter()
        .filter(|f| !found.contains_key(&f.name))
        .map(|f| f.name.as_str())
        .collect();
    Err(ParseFailure {
        message: format!(
            "the reply lacks the output field(s) {} (expected a JSON object or `name: value` lines)",
            missing
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// The output fields present in a JSON object, matching names exactly, then ignoring case.
fn pick(obj: &Map<String, Json>, outputs: &[Field]) -> Map<String, Json> {
    let mut m = Map::new();
    for f in outputs {
        let v = obj.get(&f.name).or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&f.name))
                .map(|(_, v)| v)
        });
        if let Some(v) = v {
            m.insert(f.name.clone(), v.clone());
        }
    }
    m
}

/// JSON objects found in the text, most likely first: the whole text, fenced blocks, then every
/// balanced `{…}`.
fn json_objects(text: &str) -> Vec<Map<String, Json>> {
    let mut out = Vec::new();
    let mut push = |s: &str| {
        if let Ok(Json::Object(o)) = serde_json::from_str::<Json>(s.trim()) {
            out.push(o);
        }
    };
    push(text);
    for block in fences(text) {
        push(block);
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'{' {
            if let Some(end) = balanced_end(&text[i..]) {
                push(&text[i..i + end]);
                i += end;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The contents of ``` fenced blocks: a language tag on the opening line is skipped; a block
/// on one line (```` ```json [1, 2]``` ````) starts after the fence and an optional `json`.
pub(crate) fn fences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let line_end = after.find('\n').unwrap_or(after.len());
        let body = if after[..line_end].contains(['[', '{']) {
            after.trim_start_matches("json")
        } else {
            &after[(line_end + 1).min(after.len())..]
        };
        match body.find("```") {
            Some(close) => {
                out.push(&body[..close]);
                rest = &body[close + 3..];
            }
            None => {
                out.push(body);
                break;
            }
        }
    }
    out
}

fn strip_fence(text: &str) -> &str {
    match fences(text).first() {
        Some(b) if text.starts_with("```") => b,
        _ => text,
    }
}

/// The length of the balanced `{…}` at the start of `s` (strings and escapes respected).
fn balanced_end(s: &str) -> Option<usize> {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, c) in s.char_indices() {
        if in_str {
            match c {
                _ if esc => esc = false,
                '\\' => esc = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => depth += 1,
            '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// `name: value` lines for the output fields; a value runs until the next field's line.
fn labelled_lines(text: &str, outputs: &[Field]) -> Map<String, Json> {
    let mut found: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        match label_of(line, outputs) {
            Some((name, value)) => {
                if !found.iter().any(|(n, _)| *n == name) {
                    found.push((name, value.to_string()));
                } else {
                    // A repeated label ends the reply's structured part.
                    break;
                }
            }
            None => {
                if let Some((_, v)) = found.last_mut() {
                    if !line.trim_start().starts_with("```") {
                        v.push('\n');
                        v.push_str(line);
                    }
                }
            }
        }
    }
    found
        .into_iter()
        .map(|(k, v)| (k, Json::String(v.trim().to_string())))
        .collect()
}

/// The field a line labels (`- **Answer**: x`, `answer = x`), and the rest of the line.
fn label_of<'a>(line: &'a str, outputs: &[Field]) -> Option<(String, &'a str)> {
    let l = line
        .trim_start()
        .trim_start_matches(['-', '*', '#', '>', ' ']);
    let sep = l.find([':', '='])?;
    let label = l[..sep].trim().trim_matches(['*', '_', '`', '"', ' ']);
    let field = outputs.iter().find(|f| {
        f.name.eq_ignore_ascii_case(label) || f.name.replace('_', " ").eq_ignore_ascii_case(label)
    })?;
    let value = l[sep + 1..].trim_start_matches(['*', '_']).trim();
    Some((field.name.clone(), value))
}

/// Converts each value to its field's type, in the fields' order.
fn convert(found: Map<String, Json>, outputs: &[Field]) -> Result<Json, ParseFailure> {
    let mut m = Map::new();
    for f in outputs {
        let v = found.get(&f.name).cloned().unwrap_or(Json::Null);
        let v = to_type(&v, f.ty).ok_or_else(|| ParseFailure {
            message: format!(
                "output field `{}` should be {}, got {}",
                f.name,
                f.ty.as_str(),
                clip(&v.to_string())
            ),
        })?;
        m.insert(f.name.clone(), v);
    }
    Ok(Json::Object(m))
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The first number in a text (`"about 1,234.5 km"` → 1234.5).
pub(crate) fn first_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let starts = b[i].is_ascii_digit()
            || ((b[i] == b'-' || b[i] == b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit));
        if starts {
            let mut j = i + 1;
            while j < b.len()
                && (b[j].is_ascii_digit()
                    || b[j] == b'.'
                    || (b[j] == b',' && b.get(j + 1).is_some_and(u8::is_ascii_digit))
                    || ((b[j] == b'e' || b[j] == b'E')
                        && b.get(j + 1)
                            .is_some_and(|c| c.is_ascii_digit() || *c == b'-')))
            {
                j += 1;
            }
            let num: String = s[i..j].chars().filter(|&c| c != ',').collect();
            let num = num.trim_end_matches('.');
            if let Ok(x) = num.parse::<f64>() {
                return Some(x);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    None
}

fn to_type(v: &Json, ty: FieldType) -> Option<Json> {
    match (ty, v) {
        (_, Json::Null) => None,
        (FieldType::Json, v) => Some(match v {
            Json::String(s) => serde_json::from_str(s).unwrap_or_else(|_| v.clone()),
            _ => v.clone(),
        }),
        (FieldType::Text, Json::String(s)) => Some(Json::String(s.clone())),
        (FieldType::Text, other) => Some(Json::String(other.to_string())),
        (FieldType::Number, Json::Number(n)) => Some(Json::Number(n.clone())),
        (FieldType::Number, Json::String(s)) => first_number(s)
            .and_then(serde_json::Number::from_f64)
            .map(Json::Number),
        (FieldType::Integer, Json::Number(n)) => match n.as_i64() {
            Some(i) => Some(Json::from(i)),
            None => n
                .as_f64()
                .filter(|x| x.fract() == 0.0)
                .map(|x| Json::from(x as i64)),
        },
        (FieldType::Integer, Json::String(s)) => first_number(s)
            .filter(|x| x.fract() == 0.0)
            .map(|x| Json::from(x as i64)),
        (FieldType::Bool, Json::Bool(b)) => Some(Json::Bool(*b)),
        (FieldType::Bool, Json::String(s)) => {
            match s.trim().trim_end_matches('.').to_lowercase().as_str() {
                "true" | "yes" | "y" | "1" => Some(Json::Bool(true)),
                "false" | "no" | "n" | "0" => Some(Json::Bool(false)),
                _ => None,
            }
        }
        (FieldType::List, Json::Array(a)) => Some(Json::Array(a.clone())),
        (FieldType::List, Json::String(s)) => {
            if let Ok(Json::Array(a)) = serde_json::from_str::<Json>(s.trim()) {
                return Some(Json::Array(a));
            }
            let items: Vec<Json> = if s.contains('\n') {
                s.lines()
                    .map(|l| l.trim().trim_start_matches(['-', '*', '•']).trim())
                    .filter(|l| !l.is_empty())
                    .map(|l| Json::String(l.to_string()))
                    .collect()
            } else {
                s.split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| Json::String(l.to_string()))
                    .collect()
            };
            Some(Json::Array(items))
        }
        _ => None,
    }
}
