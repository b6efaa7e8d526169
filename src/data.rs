//! Values that flow through a system, and the examples a system is scored on.
//!
//! Every value carries the population axis: a tensor is either shared by all candidates
//! (`[N, ..]`) or per candidate (`[P, N, ..]`); JSON items are either `N` shared items or a `P × N`
//! grid (candidate-major).

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result, TensorContext};
use crate::function::Json;

#[derive(Clone, Debug)]
pub(crate) enum Data {
    Tensor {
        t: Tensor,
        batched: bool,
    },
    Json {
        items: Arc<Vec<Json>>,
        batched: bool,
    },
}

/// A value in a system: a tensor or JSON items, shared by all candidates or one per candidate.
///
/// # Shapes
/// Shared tensor `[N, ..]`; per-candidate tensor `[P, N, ..]`; shared JSON: `N` items;
/// per-candidate JSON: `P·N` items, candidate-major.
#[derive(Clone, Debug)]
pub struct Value {
    pub(crate) data: Data,
    /// The DAG node that produced it (None for system inputs).
    pub(crate) node: Option<usize>,
}

impl Value {
    /// A tensor shared by all candidates, `[N, ..]`.
    pub fn shared(t: Tensor) -> Self {
        Self {
            data: Data::Tensor { t, batched: false },
            node: None,
        }
    }

    /// A per-candidate tensor, `[P, N, ..]`.
    pub fn batched(t: Tensor) -> Self {
        Self {
            data: Data::Tensor { t, batched: true },
            node: None,
        }
    }

    /// JSON items shared by all candidates (one per example).
    pub fn json(items: Vec<Json>) -> Self {
        Self {
            data: Data::Json {
                items: Arc::new(items),
                batched: false,
            },
            node: None,
        }
    }

    pub(crate) fn json_grid(items: Vec<Json>, batched: bool, node: Option<usize>) -> Self {
        Self {
            data: Data::Json {
                items: Arc::new(items),
                batched,
            },
            node,
        }
    }

    pub(crate) fn with_node(mut self, node: usize) -> Self {
        self.node = Some(node);
        self
    }

    /// The same value with its tensor copied to `device` (JSON items unchanged).
    pub(crate) fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        let data = match &self.data {
            Data::Tensor { t, batched } => Data::Tensor {
                t: t.to_device(device)?,
                batched: *batched,
            },
            json => json.clone(),
        };
        Ok(Self {
            data,
            node: self.node,
        })
    }

    /// Whether the value has a population axis (differs between candidates).
    pub fn is_batched(&self) -> bool {
        match &self.data {
            Data::Tensor { batched, .. } | Data::Json { batched, .. } => *batched,
        }
    }

    /// The tensor, if this is a tensor value.
    pub fn as_tensor(&self) -> Result<&Tensor> {
        match &self.data {
            Data::Tensor { t, .. } => Ok(t),
            Data::Json { .. } => Err(Error::WrongValueKind {
                function: "Value::as_tensor".into(),
                expected: "a tensor",
                actual: "JSON items",
            }),
        }
    }

    /// The JSON items, if this is a JSON value.
    pub fn as_json(&self) -> Result<&[Json]> {
        match &self.data {
            Data::Json { items, .. } => Ok(items),
            Data::Tensor { .. } => Err(Error::WrongValueKind {
                function: "Value::as_json".into(),
                expected: "JSON items",
                actual: "a tensor",
            }),
        }
    }

    /// Applies a tensor operation that keeps the population axis where it is (elementwise maths,
    /// operations over trailing dimensions). The result keeps this value's DAG origin.
    pub fn map_tensor(
        &self,
        f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Value> {
        let t = self.as_tensor()?;
        let out = f(t).at("Value::map_tensor")?;
        Ok(Value {
            data: Data::Tensor {
                t: out,
                batched: self.is_batched(),
            },
            node: self.node,
        })
    }

    /// Number of examples (N) along the example axis.
    pub(crate) fn examples(&self, pop: usize) -> Result<usize> {
        match &self.data {
            Data::Tensor { t, batched } => t.dim(usize::from(*batched)).at("value"),
            Data::Json { items, batched } => Ok(if *batched {
                items.len() / pop.max(1)
            } else {
                items.len()
            }),
        }
    }

    /// The examples `[start, start+len)` of a shared value.
    /// The shared examples at `idx`, in that order.
    pub(crate) fn select_examples(&self, idx: &[usize]) -> Result<Value> {
        match &self.data {
            Data::Tensor { t, batched: false } => {
                let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                let ids = Tensor::from_vec(ids, idx.len(), t.device()).at("examples")?;
                Ok(Value::shared(t.index_select(&ids, 0).at("examples")?))
            }
            Data::Json {
                items,
                batched: false,
            } => Ok(Value::json(idx.iter().map(|&i| items[i].clone()).collect())),
            _ => Err(Error::WrongValueKind {
                function: "examples".into(),
                expected: "shared examples",
                actual: "per-candidate values",
            }),
        }
    }

    pub(crate) fn slice_examples(&self, start: usize, len: usize) -> Result<Value> {
        Ok(match &self.data {
            Data::Tensor { t, batched } => Value {
                data: Data::Tensor {
                    t: t.narrow(usize::from(*batched), start, len).at("examples")?,
                    batched: *batched,
                },
                node: None,
            },
            Data::Json {
                items,
                batched: false,
            } => Value::json(items[start..start + len].to_vec()),
            Data::Json { batched: true, .. } => {
                return Err(Error::WrongValueKind {
                    function: "examples".into(),
                    expected: "shared examples",
                    actual: "per-candidate JSON",
                })
            }
        })
    }

    /// Joins chunks of examples (in order) for `pop` candidates.
    pub(crate) fn concat_examples(parts: Vec<Value>, pop: usize) -> Result<Value> {
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let any_batched = parts.iter().any(Value::is_batched);
        match &parts[0].data {
            Data::Tensor { .. } => {
                let ts = parts
                    .iter()
                    .map(|p| {
                        let t = p.as_tensor()?;
                        if any_batched && !p.is_batched() {
                            let mut dims = vec![pop];
                            dims.extend_from_slice(t.dims());
                            t.unsqueeze(0)
                                .and_then(|u| u.broadcast_as(dims))
                                .at("concat")
                        } else {
                            Ok(t.clone())
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let t = Tensor::cat(&ts, usize::from(any_batched)).at("concat")?;
                Ok(Value {
                    data: Data::Tensor {
                        t,
                        batched: any_batched,
                    },
                    node: None,
                })
            }
            Data::Json { .. } => {
                let mut rows: Vec<Vec<Json>> = vec![Vec::new(); if any_batched { pop } else { 1 }];
                for p in &parts {
                    let items = p.as_json()?;
                    if !any_batched {
                        rows[0].extend_from_slice(items);
                    } else if p.is_batched() {
                        let n = items.len() / pop.max(1);
                        for (c, row) in rows.iter_mut().enumerate() {
                            row.extend_from_slice(&items[c * n..(c + 1) * n]);
                        }
                    } else {
                        for row in rows.iter_mut() {
                            row.extend_from_slice(items);
                        }
                    }
                }
                Ok(Value::json_grid(rows.concat(), any_batched, None))
            }
        }
    }
}

/// Metadata key prefix of [`Examples::to_bytes`] for JSON items.
const EXAMPLES_KEY: &str = "hyperfunc.examples.";

/// Examples: inputs and expected outputs, `N` of each.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use hyperfunc::Examples;
/// let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &Device::Cpu)?;
/// let y = Tensor::new(&[[0f32], [1.], [1.], [0.]], &Device::Cpu)?;
/// let xor = Examples::tensors(x, y)?;
/// assert_eq!(xor.len(), 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Examples {
    pub(crate) inputs: Value,
    pub(crate) targets: Value,
    len: usize,
}

impl Examples {
    /// Tensor examples: `x: [N, ..]`, `y: [N, ..]`.
    pub fn tensors(x: Tensor, y: Tensor) -> Result<Self> {
        let n = x.dims().first().copied().unwrap_or(0);
        let m = y.dims().first().copied().unwrap_or(0);
        if n == 0 || m == 0 {
            return Err(Error::EmptyExamples);
        }
        if n != m {
            return Err(Error::ShapeMismatch {
                function: "Examples".into(),
                what: "targets".into(),
                expected: format!("{n} rows like the inputs {:?}", x.dims()),
                actual: y.dims().to_vec(),
            });
        }
        Ok(Self {
            inputs: Value::shared(x),
            targets: Value::shared(y),
            len: n,
        })
    }

    /// The same examples with their tensors copied to `device` (JSON items unchanged).
    pub(crate) fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            inputs: self.inputs.to_device(device)?,
            targets: self.targets.to_device(device)?,
            len: self.len,
        })
    }

    /// Tensor examples from row-major data: `x` has `n·d_in` values, `y` has `n·d_out`.
    pub fn from_rows(x: &[Vec<f32>], y: &[Vec<f32>], device: &Device) -> Result<Self> {
        if x.is_empty() || y.is_empty() {
            return Err(Error::EmptyExamples);
        }
        let tensor = |rows: &[Vec<f32>], what: &str| -> Result<Tensor> {
            let d = rows[0].len();
            if let Some(bad) = rows.iter().find(|r| r.len() != d) {
                return Err(Error::ShapeMismatch {
                    function: "Examples".into(),
                    what: what.into(),
                    expected: format!("every row with {d} values"),
                    actual: vec![bad.len()],
                });
            }
            Tensor::from_vec(rows.concat(), (rows.len(), d), device).at("Examples")
        };
        Self::tensors(tensor(x, "inputs")?, tensor(y, "targets")?)
    }

    /// JSON examples (for systems of async hyperfunctions).
    pub fn json(inputs: Vec<Json>, targets: Vec<Json>) -> Result<Self> {
        if inputs.is_empty() {
            return Err(Error::EmptyExamples);
        }
        if inputs.len() != targets.len() {
            return Err(Error::ShapeMismatch {
                function: "Examples".into(),
                what: "targets".into(),
                expected: format!("{} items like the inputs", inputs.len()),
                actual: vec![targets.len()],
            });
        }
        let len = inputs.len();
        Ok(Self {
            inputs: Value::json(inputs),
            targets: Value::json(targets),
            len,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The examples as bytes (safetensors: tensors as tensors, JSON items in the metadata), to
    /// ship them once to remote workers; [`Examples::from_bytes`] reads them back.
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::Examples;
    /// let data = Examples::json(vec![serde_json::json!("2+2")], vec![serde_json::json!(4)])?;
    /// let back = Examples::from_bytes(&data.to_bytes()?)?;
    /// assert_eq!(back.len(), 1);
    /// # Ok::<(), hyperfunc::Error>(())
    /// ```
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        let mut meta = std::collections::HashMap::new();
        for (key, v) in [("inputs", &self.inputs), ("targets", &self.targets)] {
            if matches!(v.data, Data::Json { .. }) {
                let items = serde_json::to_string(v.as_json()?)
                    .map_err(|e| Error::config("Examples::to_bytes", e.to_string()))?;
                meta.insert(format!("{EXAMPLES_KEY}{key}"), items);
            } else {
                tensors.push((key.to_string(), v.as_tensor()?.contiguous().at(key)?));
            }
        }
        safetensors::serialize(tensors, Some(meta))
            .map_err(|e| Error::config("Examples::to_bytes", e.to_string()))
    }

    /// Examples written by [`Examples::to_bytes`], on the CPU.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |e: String| {
            Error::config(
                "Examples::from_bytes",
                format!("{e}; give bytes that Examples::to_bytes wrote"),
            )
        };
        let mut map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let json = |key: &str| -> Result<Option<Vec<Json>>> {
            header
                .metadata()
                .as_ref()
                .and_then(|m| m.get(&format!("{EXAMPLES_KEY}{key}")))
                .map(|s| serde_json::from_str(s).map_err(|e| bad(e.to_string())))
                .transpose()
        };
        match (json("inputs")?, json("targets")?) {
            (Some(i), Some(t)) => Self::json(i, t),
            (None, None) => match (map.remove("inputs"), map.remove("targets")) {
                (Some(x), Some(y)) => Self::tensors(x, y),
                _ => Err(bad("no inputs and targets in them".into())),
            },
            _ => Err(bad("one side is JSON and the other is not".into())),
        }
    }

    /// Always false: empty example sets are refused at construction.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The inputs.
    pub fn inputs(&self) -> &Value {
        &self.inputs
    }

    /// The expected outputs.
    pub fn targets(&self) -> &Value {
        &self.targets
    }

    /// The examples at `indices`, in that order (an index may repeat).
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        if indices.is_empty() {
            return Err(Error::EmptyExamples);
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len) {
            return Err(Error::config(
                "indices",
                format!("index {bad} is out of range for {} examples", self.len),
            ));
        }
        Ok(Self {
            inputs: self.inputs.select_examples(indices)?,
            targets: self.targets.select_examples(indices)?,
            len: indices.len(),
        })
    }

    /// A deterministic split into (train, held-out): `fraction` of the examples (at least one,
    /// and at least one left to train on) go to the held-out part, chosen by a shuffle seeded
    /// with `seed`. Each part keeps the original order.
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::{Examples, Json};
    /// let xs: Vec<Json> = (0..10).map(Json::from).collect();
    /// let data = Examples::json(xs.clone(), xs)?;
    /// let (train, val) = data.split(0.3, 7)?;
    /// assert_eq!((train.len(), val.len()), (7, 3));
    /// assert_eq!(data.split(0.3, 7)?.1.inputs().as_json()?, val.inputs().as_json()?);
    /// # Ok::<(), hyperfunc::Error>(())
    /// ```
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Self, Self)> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::config(
                "fraction",
                format!("must be in (0, 1), got {fraction}"),
            ));
        }
        if self.len < 2 {
            return Err(Error::config(
                "split",
                format!("needs at least 2 examples, got {}", self.len),
            ));
        }
        let held = ((self.len as f64 * fraction).round() as usize).clamp(1, self.len - 1);
        // Fisher–Yates on the indices, driven by the crate's counter-based generator.
        let mut order: Vec<usize> = (0..self.len).collect();
        for i in (1..self.len).rev() {
            let u = crate::rng::uniform(&[seed, 0x5B17, i as u64]);
            let j = ((u * (i + 1) as f64) as usize).min(i);
            order.swap(i, j);
        }
        let mut val: Vec<usize> = order[..held].to_vec();
        let mut train: Vec<usize> = order[held..].to_vec();
        val.sort_unstable();
        train.sort_unstable();
        Ok((self.select(&train)?, self.select(&val)?))
    }
}
