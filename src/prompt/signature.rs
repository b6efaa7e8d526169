//! Signatures: a task as an instruction plus ordered, described input and output fields.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::function::Json;

/// What kind of value a field holds; outputs are converted to it when parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// Free text (a JSON string).
    #[default]
    Text,
    /// A real number.
    Number,
    /// A whole number.
    Integer,
    /// true / false.
    Bool,
    /// A list (a JSON array).
    List,
    /// Any JSON value.
    Json,
}

impl FieldType {
    /// The name shown to the model.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Text => "text",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Bool => "boolean",
            FieldType::List => "list",
            FieldType::Json => "JSON",
        }
    }

    /// The type a Rust field type maps to (by the last path segment: `String` → text, `f64` →
    /// number, `u32` → integer, `bool` → boolean, `Vec<_>` → list, anything else → JSON).
    /// The [`Signature`](macro@crate::Signature) derive uses it.
    pub fn of_rust(ty: &str) -> Self {
        let last = ty
            .split('<')
            .next()
            .unwrap_or(ty)
            .rsplit("::")
            .next()
            .unwrap_or(ty)
            .trim()
            .trim_start_matches('&')
            .trim_start_matches("'static")
            .trim();
        match last {
            "String" | "str" | "Cow" | "char" => FieldType::Text,
            "f32" | "f64" => FieldType::Number,
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" | "u8" | "u16" | "u32" | "u64"
            | "u128" | "usize" => FieldType::Integer,
            "bool" => FieldType::Bool,
            "Vec" | "VecDeque" => FieldType::List,
            _ => FieldType::Json,
        }
    }
}

/// One named, described field of a signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    /// Its name (the JSON key).
    pub name: String,
    /// What it means, for the model.
    pub desc: String,
    /// What it holds.
    pub ty: FieldType,
}

/// A task: an instruction plus input and output fields, always in declaration order.
///
/// The instruction is the part prompt learning rewrites; the fields are the contract with the
/// rest of the system and never change.
///
/// # Examples
/// ```
/// use hyperfunc::prompt::Signature;
/// use serde_json::json;
/// let sig = Signature::new("Answer questions from context.")
///     .input("context", "facts to use")
///     .input("question", "what to answer")
///     .output("answer", "a short answer");
/// let user = sig.render_user(&json!({"question": "Capital?", "context": "Paris is in France."}))?;
/// assert_eq!(user, "context: Paris is in France.\nquestion: Capital?");
/// assert!(sig.render_system(sig.instruction()).starts_with("Answer questions from context."));
/// # Ok::<(), hyperfunc::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    instruction: String,
    inputs: Vec<Field>,
    outputs: Vec<Field>,
}

/// Types with a signature, usually through `#[derive(Signature)]`.
pub trait HasSignature {
    /// The signature: doc comment = instruction, `#[input]`/`#[output]` fields in order.
    fn signature() -> Signature;
}

impl Signature {
    /// A signature with an instruction and no fields yet.
    pub fn new(instruction: impl Into<String>) -> Self {
        Self {
            instruction: instruction.into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Adds a text input field.
    pub fn input(self, name: &str, desc: &str) -> Self {
        self.input_typed(name, desc, FieldType::Text)
    }

    /// Adds an input field of type `ty`.
    pub fn input_typed(mut self, name: &str, desc: &str, ty: FieldType) -> Self {
        self.inputs.push(field(name, desc, ty));
        self
    }

    /// Adds a text output field.
    pub fn output(self, name: &str, desc: &str) -> Self {
        self.output_typed(name, desc, FieldType::Text)
    }

    /// Adds an output field of type `ty`.
    pub fn output_typed(mut self, name: &str, desc: &str, ty: FieldType) -> Self {
        self.outputs.push(field(name, desc, ty));
        self
    }

    /// The same signature with another instruction.
    pub fn with_instruction(mut self, instruction: impl Into<String>) -> Self {
        self.instruction = instruction.into();
        self
    }

    /// The instruction.
    pub fn instruction(&self) -> &str {
        &self.instruction
    }

    /// Input fields, in declaration order.
    pub fn inputs(&self) -> &[Field] {
        &self.inputs
    }

    /// Output fields, in declaration order.
    pub fn outputs(&self) -> &[Field] {
        &self.outputs
    }

    /// Checks the signature: at least one output, names non-empty identifiers, no name twice.
    pub fn validate(&self) -> Result<()> {
        if self.outputs.is_empty() {
            return Err(Error::config(
                "signature",
                "has no output field; add one with .output(name, description)",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in self.inputs.iter().chain(&self.outputs) {
            let ok = !f.name.is_empty()
                && f.name
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err(Error::config(
                    "signature",
                    format!(
                        "field name {:?} must be non-empty letters, digits, `_` or `-`",
                        f.name
                    ),
                ));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(Error::config(
                    "signature",
                    format!("field `{}` is declared twice", f.name),
                ));
            }
        }
        Ok(())
    }

    /// The fields as a list for the model, in order (`1. \`name\` (type): description`).
    pub fn render_fields(&self) -> String {
        let mut s = String::new();
        for (title, fields) in [("input", &self.inputs), ("output", &self.outputs)] {
            if fields.is_empty() {
                continue;
            }
            let _ = writeln!(s, "Your {title} fields are:");
            for (i, f) in fields.iter().enumerate() {
                let _ = write!(s, "{}. `{}` ({})", i + 1, f.name, f.ty.as_str());
                if !f.desc.is_empty() {
                    let _ = write!(s, ": {}", f.desc);
                }
                s.push('\n');
            }
        }
        s
    }

    /// The system message: `instruction`, the fields, and the reply format. Deterministic: the
    /// same signature and instruction give the same bytes, every run.
    pub fn render_system(&self, instruction: &str) -> String {
        let keys: Vec<String> = self
            .outputs
            .iter()
            .map(|f| format!("\"{}\"", f.name))
            .collect();
        format!(
            "{}\n\n{}\nReply with one JSON object with exactly these keys, in this order: {}. \
             Write nothing outside the JSON object.",
            instruction.trim(),
            self.render_fields(),
            keys.join(", ")
        )
    }

    /// The user message for one input: `name: value` lines in declaration order. The input is
    /// an object with the input fields, or — for a signature with one input — a bare value.
    pub fn render_user(&self, input: &Json) -> Result<String> {
        let value_text = |v: &Json| match v {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        };
        match (input, self.inputs.as_slice()) {
            (Json::Object(o), fields) if fields.iter().all(|f| o.contains_key(&f.name)) => {
                Ok(fields
                    .iter()
                    .map(|f| format!("{}: {}", f.name, value_text(&o[&f.name])))
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
            (Json::Object(o), [one]) if !o.contains_key(&one.name) && o.len() != 1 => {
                Ok(format!("{}: {}", one.name, input))
            }
            (Json::Object(o), [one]) if !o.contains_key(&one.name) => Ok(format!(
                "{}: {}",
                one.name,
                o.values().next().map(value_text).unwrap_or_default()
            )),
            (Json::Object(o), fields) => {
                let missing: Vec<&str> = fields
                    .iter()
                    .filter(|f| !o.contains_key(&f.name))
                    .map(|f| f.name.as_str())
                    .collect();
                Err(Error::config(
                    "input",
                    format!(
                        "lacks the input field(s) {}; the signature's inputs are {}",
                        missing.join(", "),
                        self.field_names(&self.inputs)
                    ),
                ))
            }
            (other, [one]) => Ok(format!("{}: {}", one.name, value_text(other))),
            (other, []) => Ok(value_text(other)),
            (_, fields) => Err(Error::config(
                "input",
                format!(
                    "must be a JSON object with the fields {} (the signature has {} inputs)",
                    self.field_names(fields),
                    fields.len()
                ),
            )),
        }
    }

    fn field_names(&self, fields: &[Field]) -> String {
        fields
            .iter()
            .map(|f| format!("`{}`", f.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn field(name: &str, desc: &str, ty: FieldType) -> Field {
    Field {
        name: name.to_string(),
        desc: desc.to_string(),
        ty,
    }
}
