//! Python bindings of hyperfunc: the native module `hyperfunc._hyperfunc`.
//!
//! Every Rust computation (batched tensor evaluation, the ES update, async I/O) runs on a tokio
//! runtime owned by this module while the calling Python thread has released the GIL; Python
//! callbacks (metrics, hyperfunction bodies, a system's `run`) are called with the GIL held.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Tensor};
use futures::future::BoxFuture;
use hyperfunc::{
    metric, Activation, Chain, Cx, Error, Es, Examples, HyperFn, HyperSystem, IoError, IoParams,
    Json, LmParams, Metric, ParamSpec, Population, Theta, Value,
};
use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

mod dist;
mod ledger;
mod runs;
mod tune;

create_exception!(
    _hyperfunc,
    HyperfuncError,
    PyException,
    "Base of every hyperfunc error."
);
create_exception!(
    _hyperfunc,
    ConfigError,
    HyperfuncError,
    "A setting, shape or input is wrong; the message says what to fix."
);
create_exception!(
    _hyperfunc,
    CallError,
    HyperfuncError,
    "A hyperfunction, metric or system callback failed (Python tracebacks included)."
);

/// The module's runtime: worker threads run the engine; Python threads only wait on it.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("hyperfunc")
            .build()
            .expect("the tokio runtime of hyperfunc could not start")
    })
}

/// Runs `fut` on the runtime with the GIL released, and maps its error to a Python exception.
fn block<T: Send + 'static>(
    py: Python<'_>,
    fut: impl std::future::Future<Output = hyperfunc::Result<T>> + Send + 'static,
) -> PyResult<T> {
    let handle = runtime().spawn(fut);
    let out = py.detach(|| runtime().block_on(handle));
    match out {
        Ok(r) => r.map_err(to_py),
        Err(e) => Err(HyperfuncError::new_err(format!(
            "the evaluation task ended abnormally: {e}"
        ))),
    }
}

/// A hyperfunc error as a Python exception, with the Rust message.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { .. }
        | Error::Parse { .. }
        | Error::Timeout { .. }
        | Error::BudgetExhausted { .. }
        | Error::Tensor { .. } => CallError::new_err(msg),
        Error::File { .. } => HyperfuncError::new_err(msg),
        _ => ConfigError::new_err(msg),
    }
}

/// A Python exception as text: the formatted traceback.
fn describe(py: Python<'_>, e: &PyErr) -> String {
    let tb = e.traceback(py);
    py.import("traceback")
        .and_then(|m| m.call_method1("format_exception", (e.get_type(py), e.value(py), tb)))
        .and_then(|l| l.extract::<Vec<String>>())
        .map(|l| l.concat())
        .unwrap_or_else(|_| e.to_string())
}

/// A failed Python callback as a hyperfunc error naming where it happened.
fn callback_error(py: Python<'_>, function: &str, e: &PyErr) -> Error {
    Error::Io {
        function: function.to_string(),
        message: format!("Python raised:\n{}", describe(py, e)),
        retryable: false,
    }
}

// ---------------------------------------------------------------- JSON ⇄ Python

fn to_json(v: &Bound<'_, PyAny>) -> PyResult<Json> {
    if v.is_none() {
        return Ok(Json::Null);
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(Json::Bool(b.is_true()));
    }
    if v.is_instance_of::<PyInt>() {
        if let Ok(i) = v.extract::<i64>() {
            return Ok(Json::from(i));
        }
    }
    if v.is_instance_of::<PyFloat>() || v.is_instance_of::<PyInt>() {
        let x: f64 = v.extract()?;
        return Ok(serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Json::String(s.to_cow()?.into_owned()));
    }
    if let Ok(d) = v.cast::<PyDict>() {
        let mut m = serde_json::Map::new();
        for (k, val) in d.iter() {
            let k = k.extract::<String>().map_err(|_| {
                PyTypeError::new_err("JSON objects need string keys (a dict key is not a str)")
            })?;
            m.insert(k, to_json(&val)?);
        }
        return Ok(Json::Object(m));
    }
    if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        return v
            .try_iter()?
            .map(|x| to_json(&x?))
            .collect::<PyResult<Vec<_>>>()
            .map(Json::Array);
    }
    // numpy arrays and scalars, and anything else with `tolist()`.
    if v.hasattr("tolist")? {
        return to_json(&v.call_method0("tolist")?);
    }
    Err(PyTypeError::new_err(format!(
        "cannot pass a {} as JSON (use None, bool, int, float, str, list, dict or numpy)",
        v.get_type().name()?
    )))
}

/// JSON as Python values (integers stay exact, u64 call ids included).
pub(crate) fn from_json<'py>(py: Python<'py>, v: &Json) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Json::Null => py.None().into_bound(py),
        Json::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Json::String(s) => PyString::new(py, s).into_any(),
        Json::Array(a) => {
            let items = a
                .iter()
                .map(|x| from_json(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Json::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, from_json(py, x)?)?;
            }
            d.into_any()
        }
    })
}

// ---------------------------------------------------------------- tensors ⇄ numpy

fn tensor_to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let dims = t.dims().to_vec();
    let v = t
        .flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| HyperfuncError::new_err(e.to_string()))?;
    // The Vec's buffer is handed to numpy as is (no copy).
    Ok(PyArray1::from_vec(py, v).reshape(dims)?.into_any())
}

fn numpy_to_tensor(v: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    let np = v.py().import("numpy")?;
    let a = np.call_method1("ascontiguousarray", (v, "float32"))?;
    let a = a.cast::<numpy::PyArrayDyn<f32>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be convertible to a float32 numpy array"
        ))
    })?;
    let shape = a.shape().to_vec();
    let data = a.readonly().as_slice()?.to_vec();
    Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| ConfigError::new_err(e.to_string()))
}

// ---------------------------------------------------------------- parameters

/// Shape, initialisation, noise and bounds of one learnable parameter.
#[pyclass(name = "ParamSpec", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyParamSpec(ParamSpec);

#[pymethods]
impl PyParamSpec {
    #[new]
    #[pyo3(signature = (shape, *, init=None, noise_rank=None, bounds=None))]
    fn new(
        shape: Vec<usize>,
        init: Option<&Bound<'_, PyAny>>,
        noise_rank: Option<usize>,
        bounds: Option<(f32, f32)>,
    ) -> PyResult<Self> {
        let mut s = ParamSpec::new(&shape);
        if let Some(init) = init {
            s = if let Ok(name) = init.extract::<String>() {
                match name.as_str() {
                    "zeros" => s.zeros(),
                    "xavier" | "default" => s,
                    other => {
                        return Err(ConfigError::new_err(format!(
                            "init {other:?} is unknown: use \"xavier\", \"zeros\", a number or \
                             a list of values"
                        )))
                    }
                }
            } else if let Ok(c) = init.extract::<f32>() {
                s.constant(c)
            } else {
                s.values(to_json(init).and_then(|j| {
                    serde_json::from_value::<Vec<f32>>(flatten(j)).map_err(|e| {
                        ConfigError::new_err(format!("init values must be numbers: {e}"))
                    })
                })?)
            };
        }
        if let Some(r) = noise_rank {
            s = s.noise_rank(r);
        }
        if let Some((lo, hi)) = bounds {
            s = s.bounded(lo, hi);
        }
        Ok(Self(s))
    }

    /// A weight matrix `[out, inp]`.
    #[staticmethod]
    fn matrix(out: usize, inp: usize) -> Self {
        Self(ParamSpec::matrix(out, inp))
    }

    /// A vector of `n` values.
    #[staticmethod]
    fn vector(n: usize) -> Self {
        Self(ParamSpec::vector(n))
    }

    /// One value.
    #[staticmethod]
    fn scalar() -> Self {
        Self(ParamSpec::scalar())
    }

    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.0.shape().to_vec()
    }

    fn __repr__(&self) -> String {
        format!("ParamSpec(shape={:?})", self.0.shape())
    }
}

fn flatten(j: Json) -> Json {
    match j {
        Json::Array(a) if a.iter().any(Json::is_array) => Json::Array(
            a.into_iter()
                .flat_map(|x| match flatten(x) {
                    Json::Array(b) => b,
                    other => vec![other],
                })
                .collect(),
        ),
        other => other,
    }
}

/// The five LLM sampling knobs, as ES sees them through `LmParams.spec()`.
#[pyclass(
    name = "LmParams",
    module = "hyperfunc",
    get_all,
    set_all,
    from_py_object
)]
#[derive(Clone)]
struct PyLmParams {
    temperature: f32,
    top_p: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    max_tokens_frac: f32,
}

impl From<LmParams> for PyLmParams {
    fn from(p: LmParams) -> Self {
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            max_tokens_frac: p.max_tokens_frac,
        }
    }
}

#[pymethods]
impl PyLmParams {
    #[new]
    fn new() -> Self {
        LmParams::default().into()
    }

    /// The parameter spec of the five knobs (bounded, starting at the defaults).
    #[staticmethod]
    fn spec() -> PyParamSpec {
        PyParamSpec(LmParams::spec())
    }

    /// Reads the decoded values an async hyperfunction receives.
    #[staticmethod]
    fn from_values(values: Vec<f32>) -> PyResult<Self> {
        LmParams::from_slice(&values).map(Self::from).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "LmParams(temperature={:.4}, top_p={:.4}, presence_penalty={:.4}, \
             frequency_penalty={:.4}, max_tokens_frac={:.4})",
            self.temperature,
            self.top_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.max_tokens_frac
        )
    }
}

// ---------------------------------------------------------------- hyperfunctions

/// A named unit with learnable parameters: build one with `Linear`, `Mlp`, `function` or
/// `tensor`.
#[pyclass(name = "HyperFn", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyFn(HyperFn);

#[pymethods]
impl PyFn {
    #[getter]
    fn name(&self) -> String {
        self.0.name().to_string()
    }

    #[getter]
    fn param_names(&self) -> Vec<String> {
        self.0.param_names().into_iter().map(String::from).collect()
    }

    #[getter]
    fn prompt(&self) -> Option<String> {
        self.0.prompt_text().map(String::from)
    }

    /// The same function with a prompt (the text prompt learning may rewrite).
    fn with_prompt(&self, text: String) -> Self {
        Self(self.0.clone().prompt(text))
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.0)
    }
}

fn activation(name: &str) -> PyResult<Activation> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "identity" | "linear" | "none" => Activation::Identity,
        "tanh" => Activation::Tanh,
        "relu" => Activation::Relu,
        "sigmoid" => Activation::Sigmoid,
        other => {
            return Err(ConfigError::new_err(format!(
                "activation {other:?} is unknown: use identity, tanh, relu or sigmoid"
            )))
        }
    })
}

/// A dense layer `act(x·Wᵀ + b)` that runs in Rust (low-rank fast path with `noise_rank`).
#[pyfunction]
#[pyo3(name = "Linear", signature = (name, inp, out, activation="identity", *, bias=true, noise_rank=None))]
fn linear(
    name: &str,
    inp: usize,
    out: usize,
    activation: &str,
    bias: bool,
    noise_rank: Option<usize>,
) -> PyResult<PyFn> {
    let act = self::activation(activation)?;
    let f = if bias {
        HyperFn::linear(name, inp, out, act)
    } else {
        HyperFn::linear_no_bias(name, inp, out, act)
    };
    Ok(PyFn(match noise_rank {
        Some(r) => f.noise_rank(r),
        None => f,
    }))
}

/// A multi-layer perceptron over `sizes` that runs in Rust.
#[pyfunction]
#[pyo3(name = "Mlp", signature = (name, sizes, hidden="tanh", output="identity", *, noise_rank=None))]
fn mlp(
    name: &str,
    sizes: Vec<usize>,
    hidden: &str,
    output: &str,
    noise_rank: Option<usize>,
) -> PyResult<PyFn> {
    if sizes.len() < 2 {
        return Err(ConfigError::new_err(
            "an Mlp needs at least two sizes (inputs and outputs)",
        ));
    }
    let f = HyperFn::mlp(name, &sizes, activation(hidden)?, activation(output)?);
    Ok(PyFn(match noise_rank {
        Some(r) => f.noise_rank(r),
        None => f,
    }))
}

/// A Python callable as an async hyperfunction: `fn(x)` or, with a `param`, `fn(x, values)`
/// (the decoded values as a list of floats), once per candidate × example. `async def`
/// functions run on a background asyncio loop, all in flight at once; plain functions run on
/// worker threads. Inputs and outputs are JSON-like values.
#[pyfunction]
#[pyo3(signature = (name, fn_, param=None, *, retries=0, timeout=None, concurrency=64))]
fn function(
    py: Python<'_>,
    name: &str,
    fn_: Py<PyAny>,
    param: Option<PyParamSpec>,
    retries: u32,
    timeout: Option<f64>,
    concurrency: usize,
) -> PyResult<PyFn> {
    if !fn_.bind(py).is_callable() {
        return Err(PyTypeError::new_err(format!(
            "`{name}`: fn must be callable"
        )));
    }
    let is_async: bool = py
        .import("inspect")?
        .call_method1("iscoroutinefunction", (fn_.bind(py),))?
        .extract()?;
    let with_params = param.is_some();
    let f = Arc::new(fn_);
    let label: Arc<str> = Arc::from(name);
    let hf = HyperFn::io(name, param.map(|p| p.0), move |x: Json, p: IoParams| {
        let (f, label) = (f.clone(), label.clone());
        async move {
            if is_async {
                call_async(&f, &label, x, p, with_params).await
            } else {
                let l = label.clone();
                tokio::task::spawn_blocking(move || call_sync(&f, &l, x, p, with_params))
                    .await
                    .map_err(|e| IoError::fatal(format!("`{label}`: worker failed: {e}")))?
            }
        }
    })
    .retries(retries)
    .concurrency(concurrency);
    let hf = match timeout {
        Some(s) if s > 0.0 && s.is_finite() => hf.timeout(std::time::Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(ConfigError::new_err(format!(
                "timeout must be a positive number of seconds, got {s}"
            )))
        }
        None => hf,
    };
    Ok(PyFn(hf))
}

fn args<'py>(
    py: Python<'py>,
    x: &Json,
    p: &IoParams,
    with_params: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let x = from_json(py, x)?;
    if with_params {
        PyTuple::new(py, [x, p.values().to_vec().into_pyobject(py)?.into_any()])
    } else {
        PyTuple::new(py, [x])
    }
}

fn call_sync(
    f: &Py<PyAny>,
    label: &str,
    x: Json,
    p: IoParams,
    with_params: bool,
) -> Result<Json, IoError> {
    Python::attach(|py| {
        let out = args(py, &x, &p, with_params)
            .and_then(|a| f.bind(py).call1(a))
            .and_then(|v| to_json(&v));
        out.map_err(|e| IoError::fatal(format!("`{label}`: Python raised:\n{}", describe(py, &e))))
    })
}

async fn call_async(
    f: &Py<PyAny>,
    label: &str,
    x: Json,
    p: IoParams,
    with_params: bool,
) -> Result<Json, IoError> {
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<Json, String>>();
    let tx = Mutex::new(Some(tx));
    Python::attach(|py| -> PyResult<()> {
        let coro = f.bind(py).call1(args(py, &x, &p, with_params)?)?;
        let done = pyo3::types::PyCFunction::new_closure(
            py,
            None,
            None,
            move |a: &Bound<'_, PyTuple>, _kw: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
                let ok: bool = a.get_item(0)?.extract()?;
                let v = a.get_item(1)?;
                let r = if ok {
                    to_json(&v).map_err(|e| describe(a.py(), &e))
                } else {
                    Err(v.extract::<String>()?)
                };
                if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = tx.send(r);
                }
                Ok(())
            },
        )?;
        py.import("hyperfunc._runtime")?
            .call_method1("submit", (coro, done))?;
        Ok(())
    })
    .map_err(|e| {
        IoError::fatal(Python::attach(|py| {
            format!("`{label}`: Python raised:\n{}", describe(py, &e))
        }))
    })?;
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(tb)) => Err(IoError::fatal(format!("`{label}`: Python raised:\n{tb}"))),
        Err(_) => Err(IoError::fatal(format!(
            "`{label}`: the asyncio loop dropped the call"
        ))),
    }
}

/// A tensor hyperfunction whose body is a Python callable over numpy arrays:
/// `fn(x, w) -> y` with `x: [P, N, ...]`, `w: [P, *spec.shape]`, `y: [P, N, ...]` (float32).
/// Called once per chunk with the whole population: vectorise it.
#[pyfunction]
#[pyo3(name = "tensor")]
fn tensor_fn(name: &str, spec: PyParamSpec, fn_: Py<PyAny>) -> PyFn {
    let f = Arc::new(fn_);
    let label = name.to_string();
    PyFn(HyperFn::tensor(name, spec.0, move |x, w| {
        Python::attach(|py| {
            let out = tensor_to_numpy(py, x)
                .and_then(|xa| Ok((xa, tensor_to_numpy(py, w)?)))
                .and_then(|(xa, wa)| f.bind(py).call1((xa, wa)))
                .and_then(|y| numpy_to_tensor(&y, "the tensor body's result"));
            out.map_err(|e| {
                candle_core::Error::Msg(format!("`{label}`: Python raised:\n{}", describe(py, &e)))
            })
        })
    }))
}

// ---------------------------------------------------------------- systems and values

/// A value flowing through a system: a tensor (shared `[N, ...]` or batched `[P, N, ...]`) or
/// JSON items.
#[pyclass(name = "Value", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyValue(Value);

#[pymethods]
impl PyValue {
    /// Whether it has a population axis.
    #[getter]
    fn batched(&self) -> bool {
        self.0.is_batched()
    }

    /// The tensor as a numpy array.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        tensor_to_numpy(py, self.0.as_tensor().map_err(to_py)?)
    }

    /// The JSON items as Python objects.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.0
            .as_json()
            .map_err(to_py)?
            .iter()
            .map(|j| from_json(py, j))
            .collect()
    }
}

/// A `&Cx` lent to Python for the duration of one `run` call.
#[derive(Clone, Copy)]
struct CxPtr(*const Cx);

// SAFETY: a `CxPtr` is only dereferenced while the `run` call that created it is in progress
// (see `PyCx`), and `Cx` is `Sync`, so sharing `&Cx` with another thread is sound.
unsafe impl Send for CxPtr {}

/// The context of one run of a Python system over a chunk of candidates.
#[pyclass(name = "Cx", module = "hyperfunc", frozen)]
struct PyCx {
    slot: Arc<Mutex<Option<CxPtr>>>,
}

impl PyCx {
    fn with<T>(&self, f: impl FnOnce(&Cx) -> hyperfunc::Result<T>) -> PyResult<T> {
        let guard = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ptr) = *guard else {
            return Err(ConfigError::new_err(
                "this Cx belongs to a run that has ended; use the cx passed to run()",
            ));
        };
        // SAFETY: the slot holds the pointer only while `PySystem::run` is inside its borrow of
        // the `Cx` (it clears the slot, under this same lock, before returning), and the lock
        // is held for the whole use, so the reference cannot outlive the borrow.
        let cx = unsafe { &*ptr.0 };
        f(cx).map_err(to_py)
    }
}

#[pymethods]
impl PyCx {
    /// Calls a hyperfunction on a value for every candidate and example of the chunk.
    fn call(&self, py: Python<'_>, f: PyFn, x: PyValue) -> PyResult<PyValue> {
        py.detach(|| self.with(|cx| tokio::runtime::Handle::current().block_on(cx.call(&f.0, x.0))))
            .map(PyValue)
    }

    /// Joins values along their last dimension (tensors) or into per-example arrays (JSON).
    fn combine(&self, values: Vec<PyValue>) -> PyResult<PyValue> {
        let vs: Vec<Value> = values.into_iter().map(|v| v.0).collect();
        self.with(|cx| cx.combine(&vs)).map(PyValue)
    }

    /// Splits a tensor value along its last dimension.
    fn split(&self, value: PyValue, sizes: Vec<usize>) -> PyResult<Vec<PyValue>> {
        self.with(|cx| cx.split(&value.0, &sizes))
            .map(|v| v.into_iter().map(PyValue).collect())
    }

    /// Candidates in this chunk.
    #[getter]
    fn population(&self) -> PyResult<usize> {
        self.with(|cx| Ok(cx.population()))
    }
}

/// A system written in Python: an object with `hyperfunctions()` and `run(cx, x)`.
struct PySystem {
    obj: Py<PyAny>,
    fns: Vec<HyperFn>,
}

impl PySystem {
    fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if !obj.hasattr("run")? {
            return Err(PyTypeError::new_err(
                "a system is a Chain or an object with run(cx, x) (subclass hyperfunc.HyperSystem)",
            ));
        }
        let fns = obj
            .call_method0("hyperfunctions")?
            .try_iter()?
            .map(|f| Ok(f?.extract::<PyFn>()?.0))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Self {
            obj: obj.clone().unbind(),
            fns,
        })
    }
}

impl HyperSystem for PySystem {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        self.fns.clone()
    }

    async fn run(&self, cx: &Cx, input: Value) -> hyperfunc::Result<Value> {
        tokio::task::block_in_place(|| {
            let slot = Arc::new(Mutex::new(Some(CxPtr(cx as *const Cx))));
            let out = Python::attach(|py| {
                let pycx = Py::new(py, PyCx { slot: slot.clone() })?;
                let v = self
                    .obj
                    .bind(py)
                    .call_method1("run", (pycx, PyValue(input)))?;
                v.extract::<PyValue>().map(|v| v.0).map_err(|_| {
                    PyTypeError::new_err("run() must return the Value of a cx call (or combine)")
                })
            });
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
            out.map_err(|e| Python::attach(|py| callback_error(py, "run", &e)))
        })
    }
}

/// A system: a Rust chain or a Python object.
#[derive(Clone)]
enum Sys {
    Chain(Arc<Chain>),
    Py(Arc<PySystem>),
}

impl HyperSystem for Sys {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        match self {
            Sys::Chain(c) => c.hyperfunctions(),
            Sys::Py(p) => p.hyperfunctions(),
        }
    }

    async fn run(&self, cx: &Cx, input: Value) -> hyperfunc::Result<Value> {
        match self {
            Sys::Chain(c) => c.run(cx, input).await,
            Sys::Py(p) => p.run(cx, input).await,
        }
    }
}

fn system(obj: &Bound<'_, PyAny>) -> PyResult<Sys> {
    if let Ok(c) = obj.extract::<PyChain>() {
        return Ok(Sys::Chain(c.0));
    }
    Ok(Sys::Py(Arc::new(PySystem::new(obj)?)))
}

/// Hyperfunctions applied one after another, in Rust.
#[pyclass(name = "Chain", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyChain(Arc<Chain>);

#[pymethods]
impl PyChain {
    #[new]
    fn new(stages: Vec<PyFn>) -> Self {
        Self(Arc::new(Chain::new(
            stages.into_iter().map(|f| f.0).collect(),
        )))
    }

    fn hyperfunctions(&self) -> Vec<PyFn> {
        self.0.hyperfunctions().into_iter().map(PyFn).collect()
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }
}

// ---------------------------------------------------------------- data and θ

/// Inputs and expected outputs: numpy arrays, or JSON-like items.
#[pyclass(name = "Examples", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyExamples(Examples);

#[pymethods]
impl PyExamples {
    /// Tensor examples: `x: [N, ...]`, `y: [N, ...]` (float32).
    #[new]
    fn new(x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<Self> {
        Examples::tensors(numpy_to_tensor(x, "x")?, numpy_to_tensor(y, "y")?)
            .map(Self)
            .map_err(to_py)
    }

    /// JSON examples for systems of Python functions.
    #[staticmethod]
    fn json(inputs: Vec<Bound<'_, PyAny>>, targets: Vec<Bound<'_, PyAny>>) -> PyResult<Self> {
        let i = inputs.iter().map(to_json).collect::<PyResult<Vec<_>>>()?;
        let t = targets.iter().map(to_json).collect::<PyResult<Vec<_>>>()?;
        Examples::json(i, t).map(Self).map_err(to_py)
    }

    /// A deterministic (train, held-out) split.
    fn split(&self, fraction: f64, seed: u64) -> PyResult<(Self, Self)> {
        let (a, b) = self.0.split(fraction, seed).map_err(to_py)?;
        Ok((Self(a), Self(b)))
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// The examples as bytes (safetensors), for sending them to other processes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let b = self.0.to_bytes().map_err(to_py)?;
        Ok(pyo3::types::PyBytes::new(py, &b))
    }

    /// Examples from `to_bytes`.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Examples::from_bytes(data).map(Self).map_err(to_py)
    }

    /// Pickling (Ray, multiprocessing): through `to_bytes`.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, pyo3::types::PyBytes>,))> {
        let f = slf.get_type().getattr("from_bytes")?;
        Ok((f, (slf.get().to_bytes(slf.py())?,)))
    }
}

/// θ: the named raw parameters (and prompts) of a system.
#[pyclass(name = "Theta", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
pub(crate) struct PyTheta(pub(crate) Theta);

#[pymethods]
impl PyTheta {
    /// The initial θ of a system, drawn from `seed`.
    #[staticmethod]
    #[pyo3(signature = (system, seed=0))]
    fn init(system: &Bound<'_, PyAny>, seed: u64) -> PyResult<Self> {
        let sys = self::system(system)?;
        Theta::init(&sys, seed, &Device::Cpu)
            .map(Self)
            .map_err(to_py)
    }

    /// θ from a dict of arrays (and optionally prompts by function name).
    #[staticmethod]
    #[pyo3(signature = (arrays, prompts=None))]
    fn from_numpy(
        arrays: &Bound<'_, PyDict>,
        prompts: Option<std::collections::BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let mut t = Theta::default();
        for (k, v) in arrays.iter() {
            let name: String = k.extract()?;
            t.insert(name.clone(), numpy_to_tensor(&v, &name)?);
        }
        for (f, p) in prompts.into_iter().flatten() {
            t.set_prompt(f, p);
        }
        Ok(Self(t))
    }

    /// Every parameter as a float32 numpy array, by name.
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, t) in self.0.iter() {
            d.set_item(name, tensor_to_numpy(py, t)?)?;
        }
        Ok(d)
    }

    fn __getitem__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match self.0.get(name) {
            Some(t) => tensor_to_numpy(py, t),
            None => Err(PyKeyError::new_err(format!(
                "θ has no parameter `{name}` (it has: {})",
                self.0.names().collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Parameter names, sorted.
    fn names(&self) -> Vec<String> {
        self.0.names().map(String::from).collect()
    }

    /// The prompts held, by function name.
    fn prompts(&self) -> std::collections::BTreeMap<String, String> {
        self.0
            .prompts()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// Total number of scalars.
    #[getter]
    fn num_params(&self) -> usize {
        self.0.num_params()
    }

    /// Saves as safetensors (prompts in the metadata).
    fn save(&self, path: &str) -> PyResult<()> {
        self.0.save(path).map_err(to_py)
    }

    /// Loads a file written by `save` (or any safetensors file).
    #[staticmethod]
    fn load(path: &str) -> PyResult<Self> {
        Theta::load(path, &Device::Cpu).map(Self).map_err(to_py)
    }

    /// θ as safetensors bytes (what `save` writes).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let b = self.0.to_bytes().map_err(to_py)?;
        Ok(pyo3::types::PyBytes::new(py, &b))
    }

    /// θ from `to_bytes` (or any safetensors data).
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Theta::from_bytes(data, &Device::Cpu)
            .map(Self)
            .map_err(to_py)
    }

    /// Pickling (Ray, multiprocessing): through `to_bytes`.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, pyo3::types::PyBytes>,))> {
        let f = slf.get_type().getattr("from_bytes")?;
        Ok((f, (slf.get().to_bytes(slf.py())?,)))
    }

    /// Whether every tensor and prompt is bit-identical to `other`'s.
    fn bit_eq(&self, other: &PyTheta) -> PyResult<bool> {
        self.0.bit_eq(&other.0).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Theta({} parameters: {})",
            self.0.num_params(),
            self.0.names().collect::<Vec<_>>().join(", ")
        )
    }
}

// ---------------------------------------------------------------- metrics

/// A Python metric `fn(pred, target) -> float`, called once per candidate with numpy arrays
/// (`pred: [N, ...]`) or lists of JSON items.
struct PyMetric(Py<PyAny>);

impl Metric for PyMetric {
    fn score(&self, preds: &Value, targets: &Value, pop: usize) -> hyperfunc::Result<Vec<f32>> {
        Python::attach(|py| {
            let per = |i: usize| -> PyResult<(Bound<'_, PyAny>, Bound<'_, PyAny>)> {
                if let Ok(p) = preds.as_tensor() {
                    let p = if preds.is_batched() {
                        p.get(i)
                            .map_err(|e| HyperfuncError::new_err(e.to_string()))?
                    } else {
                        p.clone()
                    };
                    let y = targets.as_tensor().map_err(to_py)?;
                    Ok((tensor_to_numpy(py, &p)?, tensor_to_numpy(py, y)?))
                } else {
                    let p = preds.as_json().map_err(to_py)?;
                    let y = targets.as_json().map_err(to_py)?;
                    let n = y.len();
                    let row = if preds.is_batched() {
                        &p[i * n..(i + 1) * n]
                    } else {
                        p
                    };
                    let row: Vec<_> = row
                        .iter()
                        .map(|j| from_json(py, j))
                        .collect::<PyResult<_>>()?;
                    let y: Vec<_> = y
                        .iter()
                        .map(|j| from_json(py, j))
                        .collect::<PyResult<_>>()?;
                    Ok((
                        PyList::new(py, row)?.into_any(),
                        PyList::new(py, y)?.into_any(),
                    ))
                }
            };
            (0..pop)
                .map(|i| {
                    per(i)
                        .and_then(|(p, y)| self.0.bind(py).call1((p, y)))
                        .and_then(|v| v.extract::<f32>())
                        .map_err(|e| callback_error(py, "metric", &e))
                })
                .collect()
        })
    }
}

fn metric_of(m: &Bound<'_, PyAny>) -> PyResult<Arc<dyn Metric>> {
    if let Ok(name) = m.extract::<String>() {
        return Ok(match name.as_str() {
            "bce" => Arc::new(metric::bce()),
            "mse" => Arc::new(metric::mse()),
            "accuracy" => Arc::new(metric::accuracy()),
            "cross_entropy" => Arc::new(metric::cross_entropy()),
            "class_accuracy" => Arc::new(metric::class_accuracy()),
            other => {
                return Err(ConfigError::new_err(format!(
                    "metric {other:?} is unknown: use bce, mse, accuracy, cross_entropy, \
                     class_accuracy, or a callable fn(pred, target) -> float"
                )))
            }
        });
    }
    if let Ok(s) = m.extract::<PyScorer>() {
        return Ok(Arc::new(eval::metric(s.0)));
    }
    if m.is_callable() {
        return Ok(Arc::new(PyMetric(m.clone().unbind())));
    }
    Err(PyTypeError::new_err(
        "metric must be a name (\"bce\", \"mse\", …) or a callable fn(pred, target) -> float",
    ))
}

/// `Arc<dyn Metric>` as a `Metric` (the engine takes `&dyn Metric`).
#[derive(Clone)]
struct Shared(Arc<dyn Metric>);

impl Metric for Shared {
    fn score(&self, p: &Value, t: &Value, pop: usize) -> hyperfunc::Result<Vec<f32>> {
        self.0.score(p, t, pop)
    }

    fn score_async<'a>(
        &'a self,
        batch: hyperfunc::metric::Batch<'a>,
    ) -> BoxFuture<'a, hyperfunc::Result<Vec<f32>>> {
        self.0.score_async(batch)
    }
}

// ---------------------------------------------------------------- LLM path and prompt learning

use hyperfunc::eval::{self, Scorer};
use hyperfunc::llm::{Budget, ChatRequest, LlmClient, LlmConfig, LlmError, LlmOptions};
use hyperfunc::prompt::{
    FieldType, Predict, PromptLearningOptimizer, PromptOptimizer, Signature, Validation,
};

fn llm_err(e: LlmError) -> PyErr {
    if matches!(e, LlmError::Config(_) | LlmError::InvalidRequest(_)) {
        ConfigError::new_err(e.to_string())
    } else {
        CallError::new_err(e.to_string())
    }
}

/// An OpenAI-compatible client: rate-limited, retrying, cached, with usage and cost accounting.
#[pyclass(name = "LlmClient", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyLlm(LlmClient);

#[pymethods]
impl PyLlm {
    #[new]
    #[pyo3(signature = (base_url, api_key=None, *, requests_per_minute=None, tokens_per_minute=None,
                        max_requests=None, max_cost_usd=None, cache_path=None, cache=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        base_url: &str,
        api_key: Option<&str>,
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u32>,
        max_requests: Option<u64>,
        max_cost_usd: Option<f64>,
        cache_path: Option<String>,
        cache: bool,
    ) -> PyResult<Self> {
        let mut cfg = LlmConfig::new(base_url);
        if let Some(k) = api_key {
            cfg = cfg.api_key(k);
        }
        if let Some(r) = requests_per_minute {
            cfg = cfg.rpm(r);
        }
        if let Some(t) = tokens_per_minute {
            cfg = cfg.tpm(t);
        }
        if let Some(p) = cache_path {
            cfg = cfg.cache(p);
        }
        cfg.no_cache = !cache;
        cfg = cfg.budget(Budget {
            max_requests,
            max_cost_usd,
        });
        LlmClient::new(cfg).map(Self).map_err(llm_err)
    }

    /// A client from `OPENAI_BASE_URL`, `OPENAI_API_KEY` and the `HYPERFUNC_LLM_*` variables.
    #[staticmethod]
    fn from_env() -> PyResult<Self> {
        LlmConfig::from_env()
            .and_then(LlmClient::new)
            .map(Self)
            .map_err(llm_err)
    }

    /// One chat completion (the GIL is released while it runs); returns the text. With a
    /// ledger attached the call is recorded against the Python caller (`file:function:line`),
    /// `label`, `run` and `user`.
    #[pyo3(signature = (model, prompt, *, system=None, temperature=None, label=None, run=None, user=None))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        model: &str,
        prompt: &str,
        system: Option<&str>,
        temperature: Option<f32>,
        label: Option<&str>,
        run: Option<&str>,
        user: Option<&str>,
    ) -> PyResult<String> {
        let mut req = ChatRequest::new(model);
        // The calling Python frame (this method has none of its own).
        if let Ok(frame) = py.import("sys")?.call_method1("_getframe", (0,)) {
            let code = frame.getattr("f_code")?;
            let file: String = code.getattr("co_filename")?.extract()?;
            let func: String = code.getattr("co_name")?.extract()?;
            let line: u32 = frame.getattr("f_lineno")?.extract()?;
            req = req.caller(&format!("{file}:{func}:{line}"));
        }
        if let Some(l) = label {
            req = req.label(l);
        }
        if let Some(r) = run {
            req = req.run(r);
        }
        if let Some(u) = user {
            req = req.user_tag(u);
        }
        if let Some(s) = system {
            req = req.system(s);
        }
        req = req.user(prompt);
        if let Some(t) = temperature {
            req = req.temperature(t);
        }
        let c = self.0.clone();
        let handle = runtime().spawn(async move { c.chat(req).await });
        match py.detach(|| runtime().block_on(handle)) {
            Ok(r) => r.map(|r| r.text).map_err(llm_err),
            Err(e) => Err(HyperfuncError::new_err(e.to_string())),
        }
    }

    /// Records every call from now on in `ledger` (a `hyperfunc.Ledger`): prompt, answer,
    /// token classes, latency, micro-dollars and caller; see `Ledger.llm_report`.
    fn attach_ledger(&self, ledger: &Bound<'_, PyAny>) -> PyResult<()> {
        self.0.attach_ledger(&ledger::ledger_of(ledger)?);
        Ok(())
    }

    /// Everything the client counted (calls, requests, cache hits, retries, tokens, cost), as a
    /// dict with `total`, `by_model` and `by_label`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = serde_json::to_value(self.0.stats())
            .map_err(|e| HyperfuncError::new_err(e.to_string()))?;
        from_json(py, &v)
    }
}

/// An LLM hyperfunction: one chat completion per candidate × example; θ is `LmParams` (unless
/// `learn=False`), the prompt is the system message.
#[pyfunction]
#[pyo3(signature = (name, client, model, prompt=None, *, learn=true, json=false))]
fn llm(
    name: &str,
    client: PyLlm,
    model: &str,
    prompt: Option<String>,
    learn: bool,
    json: bool,
) -> PyFn {
    let mut opts = LlmOptions::new(model);
    opts.learn = learn;
    opts.json = json;
    let f = HyperFn::llm_with(name, &client.0, opts);
    PyFn(match prompt {
        Some(p) => f.prompt(p),
        None => f,
    })
}

fn field_type(name: &str) -> PyResult<FieldType> {
    Ok(match name {
        "text" | "str" => FieldType::Text,
        "number" | "float" => FieldType::Number,
        "integer" | "int" => FieldType::Integer,
        "bool" | "boolean" => FieldType::Bool,
        "list" => FieldType::List,
        "json" => FieldType::Json,
        other => {
            return Err(ConfigError::new_err(format!(
                "field type {other:?} is unknown: use text, number, integer, bool, list or json"
            )))
        }
    })
}

/// A field: `name`, `(name, description)` or `(name, description, type)`.
fn fields(items: &[Bound<'_, PyAny>]) -> PyResult<Vec<(String, String, FieldType)>> {
    items
        .iter()
        .map(|it| {
            if let Ok(n) = it.extract::<String>() {
                return Ok((n, String::new(), FieldType::Text));
            }
            if let Ok((n, d)) = it.extract::<(String, String)>() {
                return Ok((n, d, FieldType::Text));
            }
            let (n, d, t) = it.extract::<(String, String, String)>().map_err(|_| {
                PyTypeError::new_err(
                    "a field is a name, (name, description) or (name, description, type)",
                )
            })?;
            Ok((n, d, field_type(&t)?))
        })
        .collect()
}

/// A task: an instruction plus ordered input and output fields.
#[pyclass(name = "Signature", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PySignature(Signature);

#[pymethods]
impl PySignature {
    #[new]
    #[pyo3(signature = (instruction, inputs, outputs))]
    fn new(
        instruction: &str,
        inputs: Vec<Bound<'_, PyAny>>,
        outputs: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut s = Signature::new(instruction);
        for (n, d, t) in fields(&inputs)? {
            s = s.input_typed(&n, &d, t);
        }
        for (n, d, t) in fields(&outputs)? {
            s = s.output_typed(&n, &d, t);
        }
        s.validate().map_err(to_py)?;
        Ok(Self(s))
    }

    #[getter]
    fn instruction(&self) -> String {
        self.0.instruction().to_string()
    }

    /// The system message for an instruction (deterministic).
    fn render_system(&self, instruction: &str) -> String {
        self.0.render_system(instruction)
    }

    /// The user message for one input.
    fn render_user(&self, input: &Bound<'_, PyAny>) -> PyResult<String> {
        self.0.render_user(&to_json(input)?).map_err(to_py)
    }
}

/// A `Predict` hyperfunction: answers a signature; outputs are dicts of the output fields.
#[pyfunction]
#[pyo3(signature = (name, client, model, signature, *, learn_prompt=true, learn_params=true))]
fn predict(
    name: &str,
    client: PyLlm,
    model: &str,
    signature: PySignature,
    learn_prompt: bool,
    learn_params: bool,
) -> PyResult<PyFn> {
    Predict::new(signature.0, model)
        .learn_prompt(learn_prompt)
        .learn_params(learn_params)
        .build(name, &client.0)
        .map(PyFn)
        .map_err(to_py)
}

/// A built-in scorer (score in [0, 1] with feedback); usable as a metric (the mean score).
#[pyclass(name = "Scorer", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyScorer(Arc<dyn Scorer>);

#[pymethods]
impl PyScorer {
    /// Exact match (case-insensitive and stripped by default).
    #[staticmethod]
    #[pyo3(signature = (*, case_sensitive=false, strip=true))]
    fn exact_match(case_sensitive: bool, strip: bool) -> Self {
        Self(Arc::new(
            eval::ExactMatch::new()
                .case_sensitive(case_sensitive)
                .strip(strip),
        ))
    }

    /// 1 within `tolerance`, falling linearly to 0 at `max_distance`.
    #[staticmethod]
    #[pyo3(signature = (*, tolerance=1e-6, max_distance=1.0))]
    fn numeric_distance(tolerance: f64, max_distance: f64) -> Self {
        Self(Arc::new(
            eval::NumericDistance::new()
                .tolerance(tolerance)
                .max_distance(max_distance),
        ))
    }

    /// The prediction must be one of `labels` and equal the target.
    #[staticmethod]
    fn classification(labels: Vec<String>) -> Self {
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        Self(Arc::new(eval::ClassificationAccuracy::new(&l)))
    }

    /// The target text (or each of a list) must appear in the prediction.
    #[staticmethod]
    #[pyo3(signature = (*, case_sensitive=false))]
    fn contains(case_sensitive: bool) -> Self {
        Self(Arc::new(
            eval::ContainsMatch::new().case_sensitive(case_sensitive),
        ))
    }

    /// The prediction must match `pattern` (an invalid pattern scores 0, saying why).
    #[staticmethod]
    #[pyo3(signature = (pattern, *, full_match=false))]
    fn regex(pattern: &str, full_match: bool) -> Self {
        Self(Arc::new(
            eval::RegexMatch::new(pattern).full_match(full_match),
        ))
    }

    /// An LLM judge on a 1–10 scale (temperature 0).
    #[staticmethod]
    #[pyo3(signature = (client, model, criteria=None))]
    fn judge(client: PyLlm, model: &str, criteria: Option<String>) -> Self {
        let j = eval::LlmJudge::new(&client.0, model);
        Self(Arc::new(match criteria {
            Some(c) => j.criteria(c),
            None => j,
        }))
    }

    /// Scores one prediction: `(score, feedback)`.
    #[pyo3(signature = (pred, expected, input=None))]
    fn score(
        &self,
        py: Python<'_>,
        pred: &Bound<'_, PyAny>,
        expected: &Bound<'_, PyAny>,
        input: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(f32, String)> {
        let (p, e) = (to_json(pred)?, to_json(expected)?);
        let i = input.map(to_json).transpose()?.unwrap_or(Json::Null);
        let s = self.0.clone();
        block(py, async move {
            let r = eval::score_all(&*s, &[i], &[p], &[e]).await?;
            Ok(r.into_iter()
                .next()
                .map(|r| (r.score, r.feedback))
                .unwrap_or_default())
        })
    }

    #[getter]
    fn name(&self) -> String {
        self.0.name().to_string()
    }
}

/// Improves the learnable prompts of `theta` by meta-prompting with `model`, keeping a rewrite
/// only if the held-out score (`validation`: a fraction, or None for train-only) improves.
/// Returns `(theta, report)` with the report as a dict.
#[pyfunction]
#[pyo3(signature = (system, theta, examples, scorer, client, model, *, max_iterations=5,
                    validation=Some(0.3), seed=0, hub=None))]
#[allow(clippy::too_many_arguments)]
fn optimize_prompts<'py>(
    py: Python<'py>,
    system: &Bound<'py, PyAny>,
    theta: PyTheta,
    examples: PyExamples,
    scorer: PyScorer,
    client: PyLlm,
    model: &str,
    max_iterations: usize,
    validation: Option<f64>,
    seed: u64,
    hub: Option<PyHub>,
) -> PyResult<(PyTheta, Bound<'py, PyAny>)> {
    let sys = self::system(system)?;
    let mut opt = PromptLearningOptimizer::new(&client.0, model)
        .max_iterations(max_iterations)
        .validation(match validation {
            Some(f) => Validation::Split(f),
            None => Validation::TrainOnly,
        })
        .seed(seed);
    if let Some(h) = hub {
        opt = opt.hub(h.0);
    }
    let (t, v) = block(py, async move {
        let r = opt
            .optimize_prompts(&sys, &theta.0, &examples.0, &*scorer.0)
            .await?;
        let v = serde_json::to_value(&r).map_err(|e| Error::InvalidConfig {
            field: "report".into(),
            reason: e.to_string(),
        })?;
        Ok((r.theta, v))
    })?;
    Ok((PyTheta(t), from_json(py, &v)?))
}

// ---------------------------------------------------------------- observability

/// Collects one record per call (tensor forward, async call, LLM call), per generation and per
/// run; summaries and JSON export.
#[pyclass(name = "Hub", module = "hyperfunc", frozen, from_py_object)]
#[derive(Clone)]
struct PyHub(hyperfunc::Hub);

#[pymethods]
impl PyHub {
    #[new]
    fn new() -> Self {
        Self(hyperfunc::Hub::new())
    }

    /// Every kept record as a dict (name, kind, parent, times, status, attributes, …).
    fn records<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, &self.0.to_json())
    }

    /// Per-function counts, error rates and latency percentiles, tokens and cost.
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = serde_json::to_value(self.0.summary())
            .map_err(|e| HyperfuncError::new_err(e.to_string()))?;
        from_json(py, &v)
    }

    /// The summary as a Markdown table.
    fn summary_markdown(&self) -> String {
        self.0.summary().to_markdown()
    }

    /// Writes the records to `path`, one JSON object per line.
    fn write_jsonl(&self, path: &str) -> PyResult<()> {
        self.0.write_jsonl(path).map_err(to_py)
    }

    /// Number of records kept.
    fn __len__(&self) -> usize {
        self.0.records().len()
    }
}

// ---------------------------------------------------------------- evaluate and optimize

/// Evaluates one θ on the examples; returns the metric.
#[pyfunction]
fn evaluate(
    py: Python<'_>,
    system: &Bound<'_, PyAny>,
    theta: PyTheta,
    examples: PyExamples,
    metric: &Bound<'_, PyAny>,
) -> PyResult<f32> {
    let (sys, m) = (self::system(system)?, Shared(metric_of(metric)?));
    block(py, async move {
        hyperfunc::evaluate(&sys, &theta.0, &examples.0, &m).await
    })
}

/// Evaluates several θ's as one population; returns one metric value per θ (NaN for a failed
/// candidate).
#[pyfunction]
#[pyo3(signature = (system, thetas, examples, metric, max_batch_size=262_144))]
fn evaluate_population(
    py: Python<'_>,
    system: &Bound<'_, PyAny>,
    thetas: Vec<PyTheta>,
    examples: PyExamples,
    metric: &Bound<'_, PyAny>,
    max_batch_size: usize,
) -> PyResult<Vec<f32>> {
    let (sys, m) = (self::system(system)?, Shared(metric_of(metric)?));
    let thetas: Vec<Theta> = thetas.into_iter().map(|t| t.0).collect();
    block(py, async move {
        let pop = Population::from_thetas(&thetas)?;
        let ev =
            hyperfunc::evaluate_population(&sys, &pop, &examples.0, &m, max_batch_size).await?;
        Ok(ev.fitness)
    })
}

/// What `optimize` returns.
#[pyclass(name = "Report", module = "hyperfunc", frozen)]
struct PyReport {
    #[pyo3(get)]
    theta: PyTheta,
    #[pyo3(get)]
    final_fitness: f32,
    #[pyo3(get)]
    best_fitness: Option<f32>,
    #[pyo3(get)]
    best_generation: Option<usize>,
    #[pyo3(get)]
    best_theta: Option<PyTheta>,
    #[pyo3(get)]
    stop: String,
    #[pyo3(get)]
    seconds: f64,
    /// The run's id in the store given to `optimize(store=...)`.
    #[pyo3(get)]
    run: Option<i64>,
    rows: Vec<hyperfunc::GenerationStats>,
}

#[pymethods]
impl PyReport {
    /// One dict per generation (generation, best, mean, std, sigma, lr, failed, evals_per_sec,
    /// seconds).
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.rows
            .iter()
            .map(|g| {
                let d = PyDict::new(py);
                d.set_item("generation", g.generation)?;
                d.set_item("best", g.best)?;
                d.set_item("mean", g.mean)?;
                d.set_item("std", g.std)?;
                d.set_item("sigma", g.sigma)?;
                d.set_item("lr", g.lr)?;
                d.set_item("failed", g.failed)?;
                d.set_item("evals_per_sec", g.evals_per_sec)?;
                d.set_item("seconds", g.seconds)?;
                Ok(d)
            })
            .collect()
    }

    /// The history as a pandas DataFrame (needs pandas).
    fn to_pandas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let pd = py.import("pandas").map_err(|_| {
            PyErr::new::<pyo3::exceptions::PyImportError, _>(
                "to_pandas() needs pandas: pip install pandas",
            )
        })?;
        pd.call_method1("DataFrame", (self.history(py)?,))
    }

    fn __repr__(&self) -> String {
        format!(
            "Report(final_fitness={}, generations={}, stop={}, seconds={:.3})",
            self.final_fitness,
            self.rows.len(),
            self.stop,
            self.seconds
        )
    }
}

/// The `Es` of the keyword arguments `optimize` and `EsWorker` share (in groups: the numbers,
/// the update, the engine).
pub(crate) fn base_es(
    (pop_size, sigma, lr, generations, seed): (usize, f64, f64, usize, u64),
    (minimize, antithetic, weight_decay, optimizer, momentum): (bool, bool, f64, &str, f64),
    (max_batch_size, max_failure_rate, init, examples_per_eval): (
        usize,
        f64,
        Option<Theta>,
        Option<usize>,
    ),
) -> PyResult<Es> {
    let mut es = Es::default()
        .pop_size(pop_size)
        .sigma(sigma)
        .lr(lr)
        .generations(generations)
        .seed(seed)
        .antithetic(antithetic)
        .weight_decay(weight_decay)
        .max_batch_size(max_batch_size)
        .max_failure_rate(max_failure_rate);
    es = if minimize {
        es.minimize()
    } else {
        es.maximize()
    };
    es = match optimizer {
        "adam" => es,
        "sgd" => es.sgd(momentum),
        "compat" => es.compat(),
        other => {
            return Err(ConfigError::new_err(format!(
                "optimizer {other:?} is unknown: use \"adam\", \"sgd\" or \"compat\""
            )))
        }
    };
    if let Some(t) = init {
        es = es.init(t);
    }
    if let Some(n) = examples_per_eval {
        es = es.examples_per_eval(n);
    }
    Ok(es)
}

/// Optimises a system's θ with OpenAI-ES; keyword arguments and defaults are the Rust `Es`'s.
#[pyfunction]
#[pyo3(signature = (
    system, examples, metric, *, pop_size=64, sigma=0.1, lr=0.05, generations=100, seed=0,
    minimize=false, antithetic=true, patience=None, target=None, weight_decay=0.0,
    optimizer="adam", momentum=0.9, max_batch_size=262_144, max_failure_rate=1.0,
    progress=true, init=None, hub=None, store=None, run=None, run_name=None,
    checkpoint_every=None, examples_per_eval=None, llm_clients=None, max_cost_usd=None,
    max_tokens=None, autotune=true
))]
#[allow(clippy::too_many_arguments)]
fn optimize(
    py: Python<'_>,
    system: &Bound<'_, PyAny>,
    examples: PyExamples,
    metric: &Bound<'_, PyAny>,
    pop_size: usize,
    sigma: f64,
    lr: f64,
    generations: usize,
    seed: u64,
    minimize: bool,
    antithetic: bool,
    patience: Option<usize>,
    target: Option<f32>,
    weight_decay: f64,
    optimizer: &str,
    momentum: f64,
    max_batch_size: usize,
    max_failure_rate: f64,
    progress: bool,
    init: Option<PyTheta>,
    hub: Option<PyHub>,
    store: Option<PathBuf>,
    run: Option<i64>,
    run_name: Option<String>,
    checkpoint_every: Option<usize>,
    examples_per_eval: Option<usize>,
    llm_clients: Option<Vec<PyLlm>>,
    max_cost_usd: Option<f64>,
    max_tokens: Option<u64>,
    autotune: bool,
) -> PyResult<PyReport> {
    let (sys, m) = (self::system(system)?, Shared(metric_of(metric)?));
    let mut es = base_es(
        (pop_size, sigma, lr, generations, seed),
        (minimize, antithetic, weight_decay, optimizer, momentum),
        (
            max_batch_size,
            max_failure_rate,
            init.map(|t| t.0),
            examples_per_eval,
        ),
    )?
    .progress(progress)
    .autotune(autotune);
    if let Some(p) = patience {
        es = es.patience(p);
    }
    if let Some(t) = target {
        es = es.target(t);
    }
    for c in llm_clients.iter().flatten() {
        es = es.llm_client(&c.0);
    }
    if let Some(usd) = max_cost_usd {
        es = es.max_cost_usd(usd);
    }
    if let Some(t) = max_tokens {
        es = es.max_tokens(t);
    }
    if let Some(h) = hub {
        es = es.hub(h.0);
    }
    if let Some(dir) = store {
        es = es
            .store(hyperfunc::runs::RunStore::open(dir).map_err(to_py)?)
            .checkpoints(hyperfunc::runs::Checkpoints {
                every: checkpoint_every,
                ..Default::default()
            });
        if let Some(id) = run {
            es = es.run(hyperfunc::runs::RunId(id));
        }
        if let Some(n) = run_name {
            es = es.run_name(n);
        }
    } else if run.is_some() {
        return Err(ConfigError::new_err(
            "run= continues a run of a store: give store=\"path/to/runs\" too",
        ));
    }
    es.validate().map_err(to_py)?;
    let r = block(py, async move { es.optimize(&sys, &examples.0, &m).await })?;
    Ok(PyReport {
        theta: PyTheta(r.theta),
        final_fitness: r.final_fitness,
        best_fitness: r.best.as_ref().map(|b| b.fitness),
        best_generation: r.best.as_ref().map(|b| b.generation),
        best_theta: r.best.map(|b| PyTheta(b.theta)),
        stop: format!("{:?}", r.stop).to_lowercase(),
        seconds: r.seconds,
        run: r.run.map(|id| id.0),
        rows: r.history,
    })
}

/// Sets the CPU kernels' worker threads (call once, before the first evaluation).
#[pyfunction]
fn set_threads(n: usize) -> PyResult<()> {
    hyperfunc::set_threads(n).map_err(to_py)
}

#[pymodule]
fn _hyperfunc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("HyperfuncError", py.get_type::<HyperfuncError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("CallError", py.get_type::<CallError>())?;
    m.add_class::<PyParamSpec>()?;
    m.add_class::<dist::PyEsWorker>()?;
    m.add_class::<PyLmParams>()?;
    m.add_class::<PyFn>()?;
    m.add_class::<PyValue>()?;
    m.add_class::<PyCx>()?;
    m.add_class::<PyChain>()?;
    m.add_class::<PyExamples>()?;
    m.add_class::<PyTheta>()?;
    m.add_class::<PyReport>()?;
    m.add_function(wrap_pyfunction!(linear, m)?)?;
    m.add_function(wrap_pyfunction!(mlp, m)?)?;
    m.add_function(wrap_pyfunction!(function, m)?)?;
    m.add_function(wrap_pyfunction!(tensor_fn, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate_population, m)?)?;
    m.add_function(wrap_pyfunction!(optimize, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_class::<PyHub>()?;
    m.add_class::<PyLlm>()?;
    m.add_class::<PySignature>()?;
    m.add_class::<PyScorer>()?;
    m.add_function(wrap_pyfunction!(llm, m)?)?;
    m.add_function(wrap_pyfunction!(predict, m)?)?;
    m.add_function(wrap_pyfunction!(optimize_prompts, m)?)?;
    m.add_class::<tune::PyTuneCore>()?;
    m.add_class::<tune::PyTuneSpec>()?;
    m.add_class::<tune::PyPendingCall>()?;
    m.add_class::<tune::PyOutcome>()?;
    m.add_class::<ledger::PyLedgerCore>()?;
    m.add_class::<ledger::PyMeterCore>()?;
    m.add_class::<runs::PyRunStore>()?;
    m.add_class::<runs::PyControl>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
