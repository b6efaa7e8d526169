//! Runs from Python: `hyperfunc.RunStore` (read a run store) and `hyperfunc.Control` (write
//! commands to a running optimisation; the same checks and the same table as the CLI's).
//! Records come back as plain dicts and lists.

use std::path::PathBuf;

use hyperfunc::eval::Dataset;
use hyperfunc::runs::{Action, RunId, RunStore};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use serde::Serialize;

use crate::{from_json, to_json, to_py, ConfigError, PyTheta};

fn py_of<'py, T: Serialize>(py: Python<'py>, v: &T) -> PyResult<Bound<'py, PyAny>> {
    let json = serde_json::to_value(v).map_err(|e| ConfigError::new_err(e.to_string()))?;
    from_json(py, &json)
}

/// A run store directory (`runs.sqlite` and one `run-<id>/` folder per run).
#[pyclass(name = "RunStore", module = "hyperfunc", frozen)]
pub(crate) struct PyRunStore(pub(crate) RunStore);

#[pymethods]
impl PyRunStore {
    /// Opens (creating it if needed) the store in `path`.
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        RunStore::open(path).map(Self).map_err(to_py)
    }

    /// The store's directory.
    #[getter]
    fn path(&self) -> String {
        self.0.dir().display().to_string()
    }

    /// Every run, newest first (dicts: id, name, task, status, stop, generation, best, config…).
    fn list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py_of(py, &self.0.list().map_err(to_py)?)
    }

    /// One run.
    fn info<'py>(&self, py: Python<'py>, run: i64) -> PyResult<Bound<'py, PyAny>> {
        py_of(py, &self.0.info(RunId(run)).map_err(to_py)?)
    }

    /// One dict per generation (gen, best, mean, std, sigma, lr, pop_size, evals, failed,
    /// evals_per_sec, seconds, tokens, usd — the last two None without an LLM client).
    fn generations<'py>(&self, py: Python<'py>, run: i64) -> PyResult<Bound<'py, PyAny>> {
        py_of(py, &self.0.generations(RunId(run)).map_err(to_py)?)
    }

    /// The event log (id, gen, at, kind, message).
    fn events<'py>(&self, py: Python<'py>, run: i64) -> PyResult<Bound<'py, PyAny>> {
        py_of(py, &self.0.events(RunId(run)).map_err(to_py)?)
    }

    /// The commands (id, source, action, at_gen, status, applied_gen, reason).
    fn commands<'py>(&self, py: Python<'py>, run: i64) -> PyResult<Bound<'py, PyAny>> {
        py_of(py, &self.0.commands(RunId(run)).map_err(to_py)?)
    }

    /// The settings in force at generation `gen` (default: now): the fold of the log.
    #[pyo3(signature = (run, gen=None))]
    fn effective_config<'py>(
        &self,
        py: Python<'py>,
        run: i64,
        gen: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self
            .0
            .effective_config(RunId(run), gen.unwrap_or(usize::MAX))
            .map_err(to_py)?;
        py_of(py, &c)
    }

    /// θ of the run's latest checkpoint.
    fn theta(&self, run: i64) -> PyResult<PyTheta> {
        self.0.theta(RunId(run)).map(PyTheta).map_err(to_py)
    }

    /// Stores a dataset (a list of `{"input", "expected", "id"?, "tags"?}` dicts, or JSON Lines
    /// text) as a new version of `name` when its content changed; the version as a dict
    /// (name, version, hash, items).
    fn put_dataset<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        items: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ds = if let Ok(text) = items.extract::<String>() {
            Dataset::from_jsonl(name, &text)
        } else {
            let json = to_json(items)?;
            let items = serde_json::from_value(json).map_err(|e| {
                ConfigError::new_err(format!(
                    "items: expected a list of {{\"input\", \"expected\", \"id\"?, \"tags\"?}} dicts ({e})"
                ))
            })?;
            Dataset::new(name, items)
        }
        .map_err(to_py)?;
        py_of(py, &self.0.put_dataset(&ds).map_err(to_py)?)
    }

    /// Records run `run`'s scores (`{item id: score}`, higher is better) on version `version`
    /// of dataset `name` (default: the newest), split `split`, under `metric`; the mean.
    #[pyo3(signature = (run, name, scores, *, metric, split="all", version=None))]
    fn record_eval(
        &self,
        run: i64,
        name: &str,
        scores: std::collections::BTreeMap<String, f64>,
        metric: &str,
        split: &str,
        version: Option<u32>,
    ) -> PyResult<f64> {
        let (_, v) = self.0.dataset(name, version).map_err(to_py)?;
        let scores: Vec<(String, f64)> = scores.into_iter().collect();
        self.0
            .record_eval(RunId(run), &v, split, metric, &scores)
            .map(|e| e.mean)
            .map_err(to_py)
    }

    /// `candidate` against `baseline` under `metric` on the same data: paired means, the
    /// difference and its 95% interval, as a dict.
    fn compare<'py>(
        &self,
        py: Python<'py>,
        baseline: i64,
        candidate: i64,
        metric: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self
            .0
            .compare(RunId(baseline), RunId(candidate), metric)
            .map_err(to_py)?;
        py_of(py, &c)
    }

    /// A handle that writes commands to run `run`.
    #[pyo3(signature = (run, source="python"))]
    fn control(&self, run: i64, source: &str) -> PyControl {
        PyControl {
            store: self.0.clone(),
            run: RunId(run),
            source: source.to_string(),
        }
    }

    fn __repr__(&self) -> String {
        format!("RunStore({:?})", self.0.dir().display().to_string())
    }
}

/// Writes commands to one run; each is checked when written (a bad one raises `ConfigError`
/// at once) and applied at the next generation boundary, or at `at_gen`.
#[pyclass(name = "Control", module = "hyperfunc", frozen)]
pub(crate) struct PyControl {
    store: RunStore,
    run: RunId,
    source: String,
}

impl PyControl {
    fn send(&self, action: Action, at_gen: Option<usize>) -> PyResult<i64> {
        let c = self.store.control(self.run).source(self.source.clone());
        let c = match at_gen {
            Some(g) => c.at_gen(g),
            None => c,
        };
        c.send(action).map_err(to_py)
    }
}

#[pymethods]
impl PyControl {
    /// Sets live settings together (all or nothing): `ctl.set(lr=0.05, sigma=0.02)`.
    #[pyo3(signature = (at_gen=None, **values))]
    fn set(&self, at_gen: Option<usize>, values: Option<&Bound<'_, PyDict>>) -> PyResult<i64> {
        let mut patch = serde_json::Map::new();
        for (k, v) in values.into_iter().flatten() {
            patch.insert(k.extract::<String>()?, to_json(&v)?);
        }
        self.send(Action::Set(patch), at_gen)
    }

    /// Clears live values: `ctl.clear("lr")`.
    #[pyo3(signature = (*names, at_gen=None))]
    fn clear(&self, names: &Bound<'_, PyTuple>, at_gen: Option<usize>) -> PyResult<i64> {
        let names: Vec<String> = names.extract()?;
        self.send(Action::Clear(names), at_gen)
    }

    /// Pauses at the next boundary.
    fn pause(&self) -> PyResult<i64> {
        self.send(Action::Pause, None)
    }

    /// Resumes a paused run.
    fn resume(&self) -> PyResult<i64> {
        self.send(Action::Resume, None)
    }

    /// Stops at the next boundary (`now=True`: cancels the generation in flight).
    #[pyo3(signature = (now=false, at_gen=None))]
    fn stop(&self, now: bool, at_gen: Option<usize>) -> PyResult<i64> {
        self.send(if now { Action::StopNow } else { Action::Stop }, at_gen)
    }

    /// Writes a checkpoint at the next boundary that retention keeps.
    fn snapshot(&self) -> PyResult<i64> {
        self.send(Action::Snapshot, None)
    }

    fn __repr__(&self) -> String {
        format!("Control(run={}, source={:?})", self.run, self.source)
    }
}
