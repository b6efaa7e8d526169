//! θ: the named raw parameter tensors of one system, and the registry of its hyperfunctions.
//!
//! θ is a plain value owned by the caller (returned by the optimizer, passed to `evaluate`), never
//! a global: two systems — or two runs of one system — cannot share or overwrite each other's
//! parameters. Tensors are stored *raw* (unbounded); bounded parameters are decoded on use.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result, TensorContext};
use crate::function::HyperFn;
use crate::param::ParamSpec;
use crate::system::HyperSystem;

/// The hyperfunctions of one system, checked for unique names, with their parameters.
#[derive(Clone, Debug)]
pub(crate) struct Registry {
    pub functions: BTreeMap<String, HyperFn>,
    /// Every parameter, sorted by full name.
    pub params: BTreeMap<String, ParamSpec>,
}

impl Registry {
    pub fn new(functions: Vec<HyperFn>) -> Result<Self> {
        let mut fns = BTreeMap::new();
        let mut params = BTreeMap::new();
        for f in functions {
            for (name, spec) in f.params() {
                spec.validate(name)?;
                if params.insert(name.clone(), spec.clone()).is_some() {
                    return Err(Error::DuplicateName { name: name.clone() });
                }
            }
            let name = f.name().to_string();
            if fns.insert(name.clone(), f).is_some() {
                return Err(Error::DuplicateName { name });
            }
        }
        Ok(Self {
            functions: fns,
            params,
        })
    }

    pub fn of<S: HyperSystem + ?Sized>(sys: &S) -> Result<Self> {
        Self::new(sys.hyperfunctions())
    }
}

/// The raw parameters of a system, by full name (`function.param`).
///
/// # Examples
/// ```
/// use hyperfunc::{Activation, Chain, HyperFn, Theta};
/// let net = Chain::new(vec![HyperFn::linear("l", 2, 3, Activation::Tanh)]);
/// let theta = Theta::init(&net, 42, &candle_core::Device::Cpu)?;
/// assert_eq!(theta.num_params(), 2 * 3 + 3);
/// # Ok::<(), hyperfunc::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Theta {
    tensors: BTreeMap<String, Tensor>,
    /// Prompt text by function name: the part of θ that prompt learning rewrites and ES never
    /// touches. A function without an entry uses its own [`HyperFn::prompt`].
    prompts: BTreeMap<String, String>,
}

/// The safetensors metadata key prefix under which [`Theta::save`] stores prompts.
const PROMPT_KEY: &str = "hyperfunc.prompt.";

impl Theta {
    /// The initial θ of a system's declared parameters, drawn from `seed`.
    pub fn init<S: HyperSystem + ?Sized>(sys: &S, seed: u64, device: &Device) -> Result<Self> {
        Self::from_registry(&Registry::of(sys)?, seed, device)
    }

    pub(crate) fn from_registry(reg: &Registry, seed: u64, device: &Device) -> Result<Self> {
        let tensors = reg
            .params
            .iter()
            .map(|(name, spec)| Ok((name.clone(), spec.initial_raw(name, seed, device)?)))
            .collect::<Result<_>>()?;
        let prompts = reg
            .functions
            .iter()
            .filter_map(|(name, f)| Some((name.clone(), f.prompt_text()?.to_string())))
            .collect();
        Ok(Self { tensors, prompts })
    }

    /// Builds θ from named tensors (no checks until used with a system).
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self {
            tensors: tensors.into_iter().collect(),
            prompts: BTreeMap::new(),
        }
    }

    /// The prompt of hyperfunction `function` in this θ, if θ holds one.
    pub fn prompt(&self, function: &str) -> Option<&str> {
        self.prompts.get(function).map(String::as_str)
    }

    /// Sets the prompt of hyperfunction `function` (it overrides the function's own prompt).
    pub fn set_prompt(&mut self, function: impl Into<String>, text: impl Into<String>) {
        self.prompts.insert(function.into(), text.into());
    }

    /// θ with the prompt of `function` replaced.
    pub fn with_prompt(mut self, function: impl Into<String>, text: impl Into<String>) -> Self {
        self.set_prompt(function, text);
        self
    }

    /// Every prompt held, as (function, text), sorted by function.
    pub fn prompts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.prompts.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// An empty θ that keeps these prompts (for building the next θ of an update).
    pub(crate) fn prompts_only(&self) -> Self {
        Self {
            tensors: BTreeMap::new(),
            prompts: self.prompts.clone(),
        }
    }

    /// The raw tensor of a parameter.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Sets a parameter's raw tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    /// Parameter names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The same θ with its tensors copied to `device` (prompts unchanged).
    pub(crate) fn to_device(&self, device: &candle_core::Device) -> candle_core::Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            tensors,
            prompts: self.prompts.clone(),
        })
    }

    /// Iterates over (name, raw tensor).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Total number of scalars.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(Tensor::elem_count).sum()
    }

    /// A parameter's raw values, flattened.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.get(name).ok_or_else(|| Error::MissingParameter {
            name: name.to_string(),
        })?;
        t.flatten_all().and_then(|t| t.to_vec1::<f32>()).at(name)
    }

    /// Checks that θ has every declared parameter with its declared shape.
    pub(crate) fn check(&self, reg: &Registry) -> Result<()> {
        if let Some(name) = self
            .prompts
            .keys()
            .find(|n| !reg.functions.contains_key(*n))
        {
            return Err(Error::config(
                "θ prompts",
                format!(
                    "θ holds a prompt for `{name}`, which is not a hyperfunction of this system \
                     (its functions: {})",
                    reg.functions.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for (name, spec) in &reg.params {
            let t = self
                .get(name)
                .ok_or_else(|| Error::MissingParameter { name: name.clone() })?;
            if t.dims() != spec.shape() {
                return Err(Error::ShapeMismatch {
                    function: name.clone(),
                    what: "θ".into(),
                    expected: format!("{:?}", spec.shape()),
                    actual: t.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Saves θ as a safetensors file; prompts go in its metadata (`hyperfunc.prompt.<fn>`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| Error::File {
            path: path.display().to_string(),
            source: e,
        })
    }

    /// θ as safetensors bytes (what [`Theta::save`] writes), to send it somewhere.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta: HashMap<String, String> = self
            .prompts
            .iter()
            .map(|(k, v)| (format!("{PROMPT_KEY}{k}"), v.clone()))
            .collect();
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.contiguous().at(k)?)))
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(tensors, (!meta.is_empty()).then_some(meta))
            .map_err(|e| Error::config("θ", format!("could not serialise θ: {e}")))
    }

    /// Loads θ (tensors and prompts) from a safetensors file onto `device`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::File {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_bytes(&bytes, device).map_err(|e| Error::File {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// θ from safetensors bytes ([`Theta::to_bytes`], or any safetensors data) onto `device`.
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::prelude::*;
    /// let net = Chain::new(vec![HyperFn::linear("f", 3, 2, Activation::Tanh)]);
    /// let theta = Theta::init(&net, 7, &candle_core::Device::Cpu)?;
    /// let back = Theta::from_bytes(&theta.to_bytes()?, &candle_core::Device::Cpu)?;
    /// assert!(back.bit_eq(&theta)?);
    /// # Ok::<(), hyperfunc::Error>(())
    /// ```
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let bad = |e: String| Error::config("θ", format!("not readable safetensors data: {e}"));
        let map =
            candle_core::safetensors::load_buffer(bytes, device).map_err(|e| bad(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let prompts = meta
            .metadata()
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.strip_prefix(PROMPT_KEY)?.to_string(), v.clone())))
            .collect();
        Ok(Self {
            tensors: map.into_iter().collect(),
            prompts,
        })
    }

    /// Whether every tensor is bit-identical to `other`'s.
    pub fn bit_eq(&self, other: &Theta) -> Result<bool> {
        if self.tensors.len() != other.tensors.len() || self.prompts != other.prompts {
            return Ok(false);
        }
        for (name, t) in &self.tensors {
            let Some(u) = other.tensors.get(name) else {
                return Ok(false);
            };
            let (a, b) = (self.values(name)?, other.values(name)?);
            if t.dims() != u.dims() || a.iter().zip(&b).any(|(x, y)| x.to_bits() != y.to_bits()) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
