//! Tuned calls from Python: the native half of `hyperfunc.Tuner` (see `hyperfunc/_tune.py`).
//!
//! `TuneCore` wraps a `hyperfunc::tune::Tuner`; `TuneSpec` is one decorated function's label,
//! choices, context, policy and objective, checked once when decorating. A sync call runs the
//! Python function inside `TuneCall::run`'s closure, with the GIL held; the future is ready after
//! one poll. An async call polls `run` once (the decision), hands the choice to Python, which
//! awaits the coroutine in its own event loop, and completes `run` through a oneshot channel.
//!
//! The store records the Python call site (`file:function:line`, through
//! `TuneCall::call_site`), and the `Outcome` carries it as a tuple.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::channel::oneshot;
use futures::task::noop_waker_ref;
use futures::FutureExt;
use hyperfunc::tune::{CallId, Choice, Objective, Outcome, Policy, TuneCall, Tuner};
use hyperfunc::Error;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::{from_json, to_py, ConfigError, HyperfuncError};

fn config(label: &str, reason: impl std::fmt::Display) -> PyErr {
    ConfigError::new_err(format!("tune `{label}`: {reason}"))
}

/// `"thompson"`, `"ucb1"`, `("epsilon_greedy", ε)` or `("fixed", "name")`.
fn policy_of(label: &str, v: &Bound<'_, PyAny>) -> PyResult<Policy> {
    if let Ok(s) = v.extract::<String>() {
        return match s.as_str() {
            "thompson" => Ok(Policy::Thompson),
            "ucb1" => Ok(Policy::Ucb1),
            "epsilon_greedy" => Ok(Policy::EpsilonGreedy(0.1)),
            other => Err(config(
                label,
                format!(
                    "unknown policy {other:?}; use \"thompson\", \"ucb1\", \
                     (\"epsilon_greedy\", ε) or (\"fixed\", name)"
                ),
            )),
        };
    }
    if let Ok((name, arg)) = v.extract::<(String, Bound<'_, PyAny>)>() {
        match name.as_str() {
            "epsilon_greedy" => {
                let e: f64 = arg.extract()?;
                if !(0.0..=1.0).contains(&e) {
                    return Err(config(label, format!("ε must be in [0, 1], got {e}")));
                }
                return Ok(Policy::EpsilonGreedy(e));
            }
            "fixed" => return Ok(Policy::Fixed(arg.extract()?)),
            _ => {}
        }
    }
    Err(config(
        label,
        format!(
            "cannot read the policy {}; use \"thompson\", \"ucb1\", (\"epsilon_greedy\", ε) \
             or (\"fixed\", name)",
            v.repr()?
        ),
    ))
}

/// `"quality"`, `("quality_minus_cost", λ per dollar)` or `("cost_cap", max mean dollars)`.
fn objective_of(label: &str, v: &Bound<'_, PyAny>) -> PyResult<Objective> {
    if let Ok(s) = v.extract::<String>() {
        if s == "quality" {
            return Ok(Objective::Quality);
        }
    }
    if let Ok((name, x)) = v.extract::<(String, f64)>() {
        if !(x.is_finite() && x >= 0.0) {
            return Err(config(
                label,
                format!("the objective's parameter must be finite and not negative, got {x}"),
            ));
        }
        match name.as_str() {
            "quality_minus_cost" => return Ok(Objective::QualityMinusCost { lambda_per_usd: x }),
            "cost_cap" => return Ok(Objective::BestQualityWithCostCap { max_mean_usd: x }),
            _ => {}
        }
    }
    Err(config(
        label,
        format!(
            "cannot read the objective {}; use \"quality\", (\"quality_minus_cost\", λ) or \
             (\"cost_cap\", dollars)",
            v.repr()?
        ),
    ))
}

/// The native half of `hyperfunc.Tuner`: the store and the policy settings.
#[pyclass(name = "TuneCore", module = "hyperfunc", frozen)]
pub struct PyTuneCore {
    tuner: Tuner,
}

#[pymethods]
impl PyTuneCore {
    #[new]
    #[pyo3(signature = (path, *, seed=None, policy=None, objective=None))]
    fn new(
        py: Python<'_>,
        path: &str,
        seed: Option<u64>,
        policy: Option<&Bound<'_, PyAny>>,
        objective: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let policy = policy.map(|p| policy_of("", p)).transpose()?;
        let objective = objective.map(|o| objective_of("", o)).transpose()?;
        let path = path.to_string();
        let mut tuner = py.detach(|| Tuner::open(&path)).map_err(to_py)?;
        if let Some(s) = seed {
            tuner = tuner.seed(s);
        }
        if let Some(p) = policy {
            tuner = tuner.policy(p);
        }
        if let Some(o) = objective {
            tuner = tuner.objective(o);
        }
        Ok(PyTuneCore { tuner })
    }

    /// A checked tuned-call setup for the decorator.
    #[pyo3(signature = (label, choices=None, context=String::new(), policy=None, objective=None))]
    fn spec(
        &self,
        label: String,
        choices: Option<Vec<String>>,
        context: String,
        policy: Option<&Bound<'_, PyAny>>,
        objective: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyTuneSpec> {
        if let Some(c) = &choices {
            if c.is_empty() {
                return Err(config(&label, "the list of choices is empty"));
            }
            for (i, x) in c.iter().enumerate() {
                if c[..i].contains(x) {
                    return Err(config(&label, format!("choice `{x}` is listed twice")));
                }
            }
        }
        let policy = policy.map(|p| policy_of(&label, p)).transpose()?;
        if let Some(Policy::Fixed(name)) = &policy {
            let known = match &choices {
                Some(c) => c.contains(name),
                None => name == "default",
            };
            if !known {
                return Err(to_py(Error::TuneUnknownChoice {
                    label: label.clone(),
                    choice: name.clone(),
                    choices: choices.unwrap_or_else(|| vec!["default".into()]),
                }));
            }
        }
        let objective = objective.map(|o| objective_of(&label, o)).transpose()?;
        Ok(PyTuneSpec {
            tuner: self.tuner.clone(),
            label,
            choices,
            context,
            policy,
            objective,
        })
    }

    /// Reports a call's reward by id.
    fn reward(&self, call_id: u64, reward: f64) -> PyResult<()> {
        self.tuner.reward(CallId(call_id), reward).map_err(to_py)
    }

    /// Reports a call's cost in dollars by id.
    fn cost(&self, call_id: u64, usd: f64) -> PyResult<()> {
        self.tuner.cost(CallId(call_id), usd).map_err(to_py)
    }

    /// Writes buffered records now.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.tuner.flush()).map_err(to_py)
    }

    /// The report as JSON-like Python values.
    #[pyo3(signature = (label=None))]
    fn report<'py>(&self, py: Python<'py>, label: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
        let r = py.detach(|| self.tuner.report(label)).map_err(to_py)?;
        let j = serde_json::to_value(&r).map_err(|e| HyperfuncError::new_err(e.to_string()))?;
        from_json(py, &j)
    }

    /// The report as a text table.
    #[pyo3(signature = (label=None))]
    fn report_table(&self, py: Python<'_>, label: Option<&str>) -> PyResult<String> {
        let r = py.detach(|| self.tuner.report(label)).map_err(to_py)?;
        Ok(r.to_table())
    }

    /// Every recorded call, oldest first, as dicts.
    #[pyo3(signature = (label=None))]
    fn calls<'py>(&self, py: Python<'py>, label: Option<&str>) -> PyResult<Bound<'py, PyAny>> {
        let r = py.detach(|| self.tuner.calls(label)).map_err(to_py)?;
        let j = serde_json::to_value(&r).map_err(|e| HyperfuncError::new_err(e.to_string()))?;
        from_json(py, &j)
    }
}

/// The error of a tuned call's closure: the setup's, or the Python function's.
enum RunErr {
    Tune(Error),
    /// The exception and its message (recorded).
    Py(PyErr, String),
    /// An async call's exception message, from Python.
    Failed(String),
    /// The async call was abandoned before it finished.
    Abandoned,
}

impl From<Error> for RunErr {
    fn from(e: Error) -> Self {
        RunErr::Tune(e)
    }
}

impl std::fmt::Display for RunErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunErr::Tune(e) => write!(f, "{e}"),
            RunErr::Py(_, m) | RunErr::Failed(m) => f.write_str(m),
            RunErr::Abandoned => f.write_str("abandoned"),
        }
    }
}

/// `TypeName: message` of an exception.
fn message(py: Python<'_>, e: &PyErr) -> String {
    let ty = e
        .get_type(py)
        .qualname()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "Exception".into());
    match e.value(py).str() {
        Ok(s) if !s.to_string().is_empty() => format!("{ty}: {s}"),
        _ => ty,
    }
}

/// One decorated function's tuned-call setup.
#[pyclass(name = "TuneSpec", module = "hyperfunc", frozen)]
pub struct PyTuneSpec {
    tuner: Tuner,
    label: String,
    choices: Option<Vec<String>>,
    context: String,
    policy: Option<Policy>,
    objective: Option<Objective>,
}

impl PyTuneSpec {
    fn call(&self) -> TuneCall {
        let mut c = self.tuner.tune(&self.label);
        if let Some(ch) = &self.choices {
            c = c.choices(ch.iter().map(String::as_str));
        }
        if !self.context.is_empty() {
            c = c.context(self.context.as_str());
        }
        if let Some(p) = &self.policy {
            c = c.policy(p.clone());
        }
        if let Some(o) = self.objective {
            c = c.objective(o);
        }
        c
    }
}

/// `file:function:line` of a `(file, function)` site tuple and a line.
fn site_label(py: Python<'_>, site: &Py<PyAny>, line: u32) -> String {
    match site.bind(py).extract::<(String, String)>() {
        Ok((file, function)) => format!("{file}:{function}:{line}"),
        Err(_) => format!("<python>:{line}"),
    }
}

fn outcome(o: Outcome, site: Py<PyAny>, line: u32) -> PyOutcome {
    PyOutcome {
        inner: o,
        site,
        line,
    }
}

#[pymethods]
impl PyTuneSpec {
    #[getter]
    fn label(&self) -> &str {
        &self.label
    }

    /// Runs `func(*args, **kwargs, choice=name)` as a tuned call; returns its value, or
    /// `(value, Outcome)` when `with_outcome`. The function's exception propagates unchanged.
    #[pyo3(signature = (func, args, kwargs, site, line, with_outcome))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        func: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<Bound<'py, PyDict>>,
        site: Py<PyAny>,
        line: u32,
        with_outcome: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kwargs = kwargs.unwrap_or_else(|| PyDict::new(py));
        let at = site_label(py, &site, line);
        let fut = self.call().call_site(at).run(|choice: Choice| {
            let r = kwargs
                .set_item(
                    pyo3::intern!(py, "choice"),
                    PyString::new(py, choice.name()),
                )
                .and_then(|()| func.call(args, Some(&kwargs)));
            std::future::ready(r.map_err(|e| {
                let m = message(py, &e);
                RunErr::Py(e, m)
            }))
        });
        match fut.now_or_never() {
            Some(Ok((value, o))) => {
                if with_outcome {
                    let o = Bound::new(py, outcome(o, site, line))?;
                    Ok(PyTuple::new(py, [value, o.into_any()])?.into_any())
                } else {
                    Ok(value)
                }
            }
            Some(Err(RunErr::Py(e, _))) => Err(e),
            Some(Err(RunErr::Tune(e))) => Err(to_py(e)),
            Some(Err(other)) => Err(HyperfuncError::new_err(other.to_string())),
            None => Err(HyperfuncError::new_err(
                "a tuned call did not finish in one step (internal error)",
            )),
        }
    }

    /// Decides an async call's choice; the returned `PendingCall` records it when finished.
    fn start(&self, py: Python<'_>, site: Py<PyAny>, line: u32) -> PyResult<PyPendingCall> {
        let at = site_label(py, &site, line);
        let (tx, rx) = oneshot::channel::<Result<(), String>>();
        let slot: Arc<Mutex<Option<Choice>>> = Arc::new(Mutex::new(None));
        let put = slot.clone();
        let mut fut: RunFuture = Box::pin(self.call().call_site(at).run(move |choice: Choice| {
            *put.lock().unwrap_or_else(|p| p.into_inner()) = Some(choice);
            async move {
                match rx.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(m)) => Err(RunErr::Failed(m)),
                    Err(_) => Err(RunErr::Abandoned),
                }
            }
        }));
        match fut
            .as_mut()
            .poll(&mut Context::from_waker(noop_waker_ref()))
        {
            Poll::Ready(Err(RunErr::Tune(e))) => return Err(to_py(e)),
            Poll::Ready(_) => {
                return Err(HyperfuncError::new_err(
                    "a tuned call finished before it started (internal error)",
                ))
            }
            Poll::Pending => {}
        }
        let choice = slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|c| c.name().to_string())
            .ok_or_else(|| HyperfuncError::new_err("a tuned call made no decision"))?;
        Ok(PyPendingCall {
            choice,
            site,
            line,
            state: Mutex::new(Some((fut, tx))),
        })
    }
}

type RunFuture = Pin<Box<dyn Future<Output = Result<((), Outcome), RunErr>> + Send>>;
/// What an async call's coroutine reports: success, or the exception's message.
type Done = oneshot::Sender<Result<(), String>>;

/// An async tuned call whose coroutine is running: `finish` records it.
#[pyclass(name = "PendingCall", module = "hyperfunc", frozen)]
pub struct PyPendingCall {
    choice: String,
    site: Py<PyAny>,
    line: u32,
    state: Mutex<Option<(RunFuture, Done)>>,
}

#[pymethods]
impl PyPendingCall {
    /// The chosen name.
    #[getter]
    fn choice(&self) -> &str {
        &self.choice
    }

    /// Records the call: succeeded (`error=None`) or failed with the exception's message.
    /// Returns the `Outcome` of a success, `None` of a failure.
    #[pyo3(signature = (error=None))]
    fn finish(&self, py: Python<'_>, error: Option<String>) -> PyResult<Option<PyOutcome>> {
        let Some((mut fut, tx)) = self.state.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return Err(HyperfuncError::new_err(
                "this tuned call was already finished",
            ));
        };
        let _ = tx.send(error.map_or(Ok(()), Err));
        match fut
            .as_mut()
            .poll(&mut Context::from_waker(noop_waker_ref()))
        {
            Poll::Ready(Ok(((), o))) => Ok(Some(outcome(o, self.site.clone_ref(py), self.line))),
            Poll::Ready(Err(RunErr::Failed(_))) => Ok(None),
            Poll::Ready(Err(e)) => Err(HyperfuncError::new_err(e.to_string())),
            Poll::Pending => Err(HyperfuncError::new_err(
                "a tuned call did not finish (internal error)",
            )),
        }
    }

    /// Drops the call without recording it (the coroutine was cancelled).
    fn abandon(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// A finished tuned call: report its reward and cost here.
#[pyclass(name = "Outcome", module = "hyperfunc", frozen)]
pub struct PyOutcome {
    inner: Outcome,
    site: Py<PyAny>,
    line: u32,
}

#[pymethods]
impl PyOutcome {
    /// Reports the call's reward (once; finite). Rewards in {0, 1} use a Beta posterior;
    /// any other value switches the label to a continuous reward model.
    fn reward(&self, reward: f64) -> PyResult<()> {
        self.inner.reward(reward).map_err(to_py)
    }

    /// Reports the call's cost in dollars (once; finite, not negative).
    fn cost(&self, usd: f64) -> PyResult<()> {
        self.inner.cost(usd).map_err(to_py)
    }

    /// The call id, for `Tuner.reward(id, r)` later.
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id().0
    }

    /// The chosen name.
    #[getter]
    fn choice(&self) -> &str {
        self.inner.choice().name()
    }

    /// The probability the policy had of this decision (None when not estimated).
    #[getter]
    fn probability(&self) -> Option<f64> {
        self.inner.probability()
    }

    /// Seconds the function ran.
    #[getter]
    fn latency_s(&self) -> f64 {
        self.inner.latency_s()
    }

    /// The Python call site: `(file, function, line)`.
    #[getter]
    fn caller<'py>(&self, py: Python<'py>) -> PyResult<(String, String, u32)> {
        let (file, func): (String, String) = self.site.bind(py).extract()?;
        Ok((file, func, self.line))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let site = self
            .caller(py)
            .map(|(f, n, l)| format!("{f}:{l} in {n}"))
            .unwrap_or_default();
        let probability = self
            .inner
            .probability()
            .map_or_else(|| "None".to_string(), |p| format!("{p}"));
        format!(
            "Outcome(id={}, choice={:?}, probability={probability}, latency_s={:.6}, caller={:?})",
            self.inner.id().0,
            self.inner.choice().name(),
            self.inner.latency_s(),
            site
        )
    }
}
