//! Hyperfunctions: named units that own learnable parameters and a body.
//!
//! A *tensor* body runs over the whole population chunk at once (`x: [P, N, ..]`, `θ: [P, ..]`).
//! The built-in [`HyperFn::linear`] and [`HyperFn::mlp`] layers know the structure of their
//! parameters and take the low-rank fast path (the perturbed weight matrix is never formed). An
//! *async* body ([`HyperFn::io`]) is called once per candidate × example, concurrently, under a
//! [`RuntimePolicy`]. This module describes functions; running them is the system's job.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use futures::future::BoxFuture;

use crate::param::{LmParams, ParamSpec};

/// A JSON value: the currency of async hyperfunctions.
pub type Json = serde_json::Value;

/// The error an async body returns: a message and whether retrying could help.
///
/// # Examples
/// ```
/// use hyperfunc::IoError;
/// let e = IoError::retryable("HTTP 503");
/// assert!(e.retryable);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    /// What went wrong.
    pub message: String,
    /// Whether the runtime should retry the call.
    pub retryable: bool,
    /// The output the body could not parse, for [`IoError::parse`] errors.
    pub unparsed: Option<String>,
}

impl IoError {
    /// A transient failure (rate limit, 5xx, connection reset): the runtime retries it.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            unparsed: None,
        }
    }

    /// A permanent failure (bad request, parse error): never retried.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            unparsed: None,
        }
    }

    /// The body got an answer but could not read the output it needs from it (a model that
    /// ignored the requested format). Never retried; surfaces as [`crate::Error::Parse`] and
    /// counts against the candidate.
    pub fn parse(message: impl Into<String>, unparsed: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            unparsed: Some(unparsed.into()),
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for IoError {}

/// Decoded parameters handed to an async body for one candidate.
#[derive(Debug, Clone)]
pub struct IoParams {
    pub(crate) values: Arc<[f32]>,
    pub(crate) prompt: Option<Arc<str>>,
}

impl IoParams {
    /// All decoded values of the function's parameters, concatenated in declaration order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The function's prompt ([`HyperFn::prompt`]), if it has one.
    pub fn prompt(&self) -> Option<&str> {
        self.prompt.as_deref()
    }

    /// The values read as [`LmParams`] (for a function whose parameter is [`LmParams::spec`]).
    pub fn lm(&self) -> crate::Result<LmParams> {
        LmParams::from_slice(&self.values)
    }
}

/// An elementwise activation of a built-in layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// No activation.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + e^{−x})`.
    Sigmoid,
    /// GELU (tanh approximation).
    Gelu,
}

impl Activation {
    pub(crate) fn apply(self, x: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Identity => Ok(x),
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => crate::param::sigmoid(&x),
            Activation::Gelu => x.gelu(),
        }
    }
}

/// How an async hyperfunction is run: retries, timeout, call budget, concurrency.
///
/// Retries apply only to retryable errors (see [`IoError::retryable`]) and timeouts; the timeout
/// drops (cancels) the call's future; the budget counts attempts within one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimePolicy {
    /// Extra attempts after a retryable failure.
    pub retries: u32,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Most attempts allowed within one evaluation (one `evaluate` / one generation).
    pub max_calls: Option<usize>,
    /// Most calls of this function in flight at once.
    pub concurrency: usize,
    /// Base delay of the exponential backoff between retries (full jitter).
    pub backoff: Duration,
}

impl Default for RuntimePolicy {
    fn default() -> Self {
        Self {
            retries: 2,
            timeout: None,
            max_calls: None,
            concurrency: 64,
            backoff: Duration::from_millis(50),
        }
    }
}

pub(crate) type TensorBody =
    Arc<dyn Fn(&Tensor, &[Tensor]) -> candle_core::Result<Tensor> + Send + Sync>;
pub(crate) type IoBody =
    Arc<dyn Fn(Json, IoParams) -> BoxFuture<'static, Result<Json, IoError>> + Send + Sync>;

/// One dense layer of a built-in network.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layer {
    pub inp: usize,
    pub out: usize,
    pub act: Activation,
    pub bias: bool,
}

#[derive(Clone)]
pub(crate) enum Body {
    Tensor(TensorBody),
    /// Built-in dense layers; parameters `weight`/`bias` per layer, in order.
    Layers(Vec<Layer>),
    Io(IoBody),
}

#[derive(Clone)]
pub(crate) struct Inner {
    pub name: String,
    /// The name again, shared, for cheap observation records.
    pub label: Arc<str>,
    /// Full parameter names (`fn.param`) and their specs, in declaration order.
    pub params: Vec<(String, ParamSpec)>,
    pub body: Body,
    pub policy: RuntimePolicy,
    pub prompt: Option<String>,
    /// Whether prompt learning may rewrite the prompt.
    pub prompt_learnable: bool,
    /// The task the prompt serves, shown to the meta-prompt model.
    pub signature: Option<Arc<crate::prompt::Signature>>,
}

/// A named unit with learnable parameters and a body. Cheap to clone (shared).
///
/// # Examples
/// ```
/// use hyperfunc::{Activation, HyperFn, ParamSpec};
/// // A built-in layer with low-rank noise: θ = {hidden.weight [4,2], hidden.bias [4]}.
/// let hidden = HyperFn::linear("hidden", 2, 4, Activation::Tanh).noise_rank(2);
/// assert_eq!(hidden.param_names(), vec!["hidden.weight", "hidden.bias"]);
/// // An arbitrary tensor body over batched tensors: x [P,N,2], w [P,2,3].
/// let proj = HyperFn::tensor("proj", ParamSpec::matrix(2, 3), |x, w| x.matmul(w));
/// assert_eq!(proj.name(), "proj");
/// ```
#[derive(Clone)]
pub struct HyperFn(pub(crate) Arc<Inner>);

impl fmt::Debug for HyperFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.0.body {
            Body::Tensor(_) => "tensor",
            Body::Layers(_) => "layers",
            Body::Io(_) => "io",
        };
        f.debug_struct("HyperFn")
            .field("name", &self.0.name)
            .field("kind", &kind)
            .field("params", &self.param_names())
            .finish()
    }
}

impl HyperFn {
    fn build(name: &str, params: Vec<(String, ParamSpec)>, body: Body) -> Self {
        Self(Arc::new(Inner {
            name: name.to_string(),
            label: Arc::from(name),
            params,
            body,
            policy: RuntimePolicy::default(),
            prompt: None,
            prompt_learnable: true,
            signature: None,
        }))
    }

    /// A tensor hyperfunction with one parameter (named like the function).
    ///
    /// # Shapes
    /// The body gets `x: [P, N, ..]` (a shared input is broadcast) and `θ: [P, ..spec.shape]`
    /// (decoded), and must return `[P, N, ..]`.
    pub fn tensor<F>(name: &str, spec: ParamSpec, body: F) -> Self
    where
        F: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    {
        Self::tensor_multi(name, vec![(String::new(), spec)], move |x, ps| {
            body(x, &ps[0])
        })
    }

    /// A tensor hyperfunction with several named parameters (`name.param`); an empty parameter
    /// name means the function's own name. The body gets them in the order given.
    pub fn tensor_multi<F>(name: &str, params: Vec<(String, ParamSpec)>, body: F) -> Self
    where
        F: Fn(&Tensor, &[Tensor]) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    {
        let params = params
            .into_iter()
            .map(|(p, s)| (full_name(name, &p), s))
            .collect();
        Self::build(name, params, Body::Tensor(Arc::new(body)))
    }

    /// A dense layer `act(x·Wᵀ + b)` with `W: [out, inp]` (Xavier-like) and `b: [out]` (zeros).
    pub fn linear(name: &str, inp: usize, out: usize, act: Activation) -> Self {
        Self::dense(name, inp, out, act, true)
    }

    /// A dense layer `act(x·Wᵀ)` without bias; `W: [out, inp]` (Xavier-like).
    pub fn linear_no_bias(name: &str, inp: usize, out: usize, act: Activation) -> Self {
        Self::dense(name, inp, out, act, false)
    }

    fn dense(name: &str, inp: usize, out: usize, act: Activation, bias: bool) -> Self {
        let layer = Layer {
            inp,
            out,
            act,
            bias,
        };
        Self::mlp_layers(name, &[layer], false)
    }

    /// A multilayer perceptron over `sizes` (`[2, 4, 1]` is 2→4→1), with `hidden` activations
    /// between layers and `output` after the last. Parameters `name.{i}.weight`, `name.{i}.bias`.
    pub fn mlp(name: &str, sizes: &[usize], hidden: Activation, output: Activation) -> Self {
        let n = sizes.len().saturating_sub(1);
        let layers: Vec<Layer> = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| Layer {
                inp: w[0],
                out: w[1],
                act: if i + 1 == n { output } else { hidden },
                bias: true,
            })
            .collect();
        Self::mlp_layers(name, &layers, true)
    }

    fn mlp_layers(name: &str, layers: &[Layer], indexed: bool) -> Self {
        let mut params = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let prefix = if indexed {
                format!("{name}.{i}")
            } else {
                name.to_string()
            };
            params.push((format!("{prefix}.weight"), ParamSpec::matrix(l.out, l.inp)));
            if l.bias {
                params.push((format!("{prefix}.bias"), ParamSpec::vector(l.out).zeros()));
            }
        }
        Self::build(name, params, Body::Layers(layers.to_vec()))
    }

    /// An async hyperfunction: `body(input, params)` is called once per candidate × example.
    ///
    /// A function with no parameters (`spec = None`) and a shared input is called once per
    /// example and its output is shared by all candidates.
    pub fn io<F, Fut>(name: &str, spec: Option<ParamSpec>, body: F) -> Self
    where
        F: Fn(Json, IoParams) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Json, IoError>> + Send + 'static,
    {
        let params = spec.into_iter().map(|s| (name.to_string(), s)).collect();
        let body: IoBody = Arc::new(move |x, p| Box::pin(body(x, p)));
        Self::build(name, params, Body::Io(body))
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        f(Arc::make_mut(&mut self.0));
        self
    }

    /// Uses low-rank noise of rank `r` for every weight matrix of the function.
    pub fn noise_rank(self, r: usize) -> Self {
        self.edit(|i| {
            for (_, s) in i.params.iter_mut() {
                if s.shape().len() == 2 {
                    *s = s.clone().noise_rank(r);
                }
            }
        })
    }

    /// Replaces the spec of parameter `param` (full name) — for instance to change its init.
    pub fn with_param(self, param: &str, spec: ParamSpec) -> Self {
        self.edit(|i| {
            for (n, s) in i.params.iter_mut() {
                if n == param {
                    *s = spec.clone();
                }
            }
        })
    }

    /// Sets the runtime policy of an async function.
    pub fn policy(self, policy: RuntimePolicy) -> Self {
        self.edit(|i| i.policy = policy)
    }

    /// Extra attempts after a retryable failure.
    pub fn retries(self, n: u32) -> Self {
        self.edit(|i| i.policy.retries = n)
    }

    /// Per-attempt timeout; an expired call is cancelled.
    pub fn timeout(self, d: Duration) -> Self {
        self.edit(|i| i.policy.timeout = Some(d))
    }

    /// Most attempts allowed within one evaluation.
    pub fn max_calls(self, n: usize) -> Self {
        self.edit(|i| i.policy.max_calls = Some(n))
    }

    /// Most calls in flight at once.
    pub fn concurrency(self, n: usize) -> Self {
        self.edit(|i| i.policy.concurrency = n.max(1))
    }

    /// Attaches a prompt (text the prompt optimizer may rewrite; never touched by ES).
    pub fn prompt(self, text: impl Into<String>) -> Self {
        let text = text.into();
        self.edit(|i| i.prompt = Some(text))
    }

    /// Keeps the prompt fixed: prompt learning will not rewrite it.
    pub fn freeze_prompt(self) -> Self {
        self.edit(|i| i.prompt_learnable = false)
    }

    /// Whether prompt learning may rewrite this function's prompt (it has one and it is not
    /// frozen).
    pub fn prompt_learnable(&self) -> bool {
        self.0.prompt.is_some() && self.0.prompt_learnable
    }

    /// Describes the task the prompt serves (shown to the prompt optimizer's meta-prompt).
    pub fn with_signature(self, signature: crate::prompt::Signature) -> Self {
        let signature = Arc::new(signature);
        self.edit(|i| i.signature = Some(signature))
    }

    /// The signature of a [`HyperFn::predict`] function (or one set with
    /// [`HyperFn::with_signature`]).
    pub fn signature(&self) -> Option<&crate::prompt::Signature> {
        self.0.signature.as_deref()
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The prompt, if any.
    pub fn prompt_text(&self) -> Option<&str> {
        self.0.prompt.as_deref()
    }

    /// Full names of its parameters, in declaration order.
    pub fn param_names(&self) -> Vec<&str> {
        self.0.params.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Parameter names and specs.
    pub fn params(&self) -> &[(String, ParamSpec)] {
        &self.0.params
    }

    /// The runtime policy.
    pub fn runtime_policy(&self) -> &RuntimePolicy {
        &self.0.policy
    }

    /// Whether this is a tensor function (built-in layers included).
    pub fn is_tensor(&self) -> bool {
        !matches!(self.0.body, Body::Io(_))
    }
}

fn full_name(function: &str, param: &str) -> String {
    if param.is_empty() {
        function.to_string()
    } else {
        format!("{function}.{param}")
    }
}
