//! `EsWorker`: one worker of a distributed ES run (`hyperfunc.ray` drives several). It holds the
//! system, the examples and the run's state; it evaluates the pair ranges it is handed and
//! applies every generation's update from the full fitness vector, so θ never travels.

use std::sync::Arc;

use hyperfunc::EsRun;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{
    base_es, block, metric_of, system, to_py, ConfigError, PyExamples, PyTheta, Shared, Sys,
};

/// One worker of a distributed run: build it with the same settings on every worker.
#[pyclass(name = "EsWorker", module = "hyperfunc", frozen)]
pub(crate) struct PyEsWorker {
    run: Arc<tokio::sync::Mutex<EsRun>>,
    sys: Sys,
    examples: hyperfunc::Examples,
    metric: Shared,
}

/// Fitness values as little-endian f32 bytes (4 per candidate).
fn f32s(bytes: &[u8], what: &str) -> PyResult<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(ConfigError::new_err(format!(
            "{what}: {} bytes are not whole f32 values (4 bytes each, little-endian)",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl PyEsWorker {
    /// The run, from a Python thread (never a runtime thread, so blocking is allowed).
    fn lock(&self) -> tokio::sync::MutexGuard<'_, EsRun> {
        self.run.blocking_lock()
    }
}

#[pymethods]
impl PyEsWorker {
    /// A worker: the system, the examples, the metric and `optimize`'s ES keyword arguments.
    #[new]
    #[pyo3(signature = (
        system, examples, metric, *, pop_size=64, sigma=0.1, lr=0.05, generations=100, seed=0,
        minimize=false, antithetic=true, weight_decay=0.0, optimizer="adam", momentum=0.9,
        max_batch_size=262_144, max_failure_rate=1.0, init=None, examples_per_eval=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
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
        weight_decay: f64,
        optimizer: &str,
        momentum: f64,
        max_batch_size: usize,
        max_failure_rate: f64,
        init: Option<PyTheta>,
        examples_per_eval: Option<usize>,
    ) -> PyResult<Self> {
        let sys = self::system(system)?;
        let es = base_es(
            (pop_size, sigma, lr, generations, seed),
            (minimize, antithetic, weight_decay, optimizer, momentum),
            (
                max_batch_size,
                max_failure_rate,
                init.map(|t| t.0),
                examples_per_eval,
            ),
        )?
        .progress(false)
        .autotune(false);
        let run = es.start(&sys).map_err(to_py)?;
        Ok(Self {
            run: Arc::new(tokio::sync::Mutex::new(run)),
            sys,
            examples: examples.0,
            metric: Shared(metric_of(metric)?),
        })
    }

    /// Units of a generation: antithetic pairs (2 candidates each), else single candidates.
    #[getter]
    fn pairs(&self) -> usize {
        self.lock().pairs()
    }

    /// Candidates per unit of `pairs` (2 or 1).
    #[getter]
    fn candidates_per_pair(&self) -> usize {
        self.lock().candidates_per_pair()
    }

    /// Generations applied so far.
    #[getter]
    fn generation(&self) -> usize {
        self.lock().generation()
    }

    /// The mean θ.
    #[getter]
    fn theta(&self) -> PyTheta {
        PyTheta(self.lock().theta().clone())
    }

    /// Fitness of pairs `start..end` of generation `generation`, as little-endian f32 bytes
    /// (one value per candidate). Asking for another generation than the worker's is an error.
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        generation: usize,
        start: usize,
        end: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (run, sys, ex, m) = (
            self.run.clone(),
            self.sys.clone(),
            self.examples.clone(),
            self.metric.clone(),
        );
        let out = block(py, async move {
            let mut run = run.lock().await;
            if run.generation() != generation {
                return Err(hyperfunc::Error::InvalidConfig {
                    field: "EsWorker.evaluate".into(),
                    reason: format!(
                        "this worker is at generation {}, asked to evaluate generation \
                         {generation}: replay the missing generations first",
                        run.generation()
                    ),
                });
            }
            run.evaluate_pairs(&sys, &ex, &m, start..end).await
        });
        let fitness = out?;
        let bytes: Vec<u8> = fitness.iter().flat_map(|f| f.to_le_bytes()).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    /// Applies this generation's update from all its fitness values (little-endian f32 bytes).
    fn tell(&self, py: Python<'_>, fitness: &[u8]) -> PyResult<()> {
        let f = f32s(fitness, "tell")?;
        let mut run = self.lock();
        py.detach(|| run.tell_all(&f)).map(|_| ()).map_err(to_py)
    }

    /// Applies generations from their fitness alone (a list of `tell`'s byte strings).
    fn replay(&self, py: Python<'_>, log: Vec<Vec<u8>>) -> PyResult<()> {
        let log = log
            .iter()
            .map(|b| f32s(b, "replay"))
            .collect::<PyResult<Vec<_>>>()?;
        let mut run = self.lock();
        py.detach(|| run.replay(&log)).map_err(to_py)
    }

    /// A 64-bit hash of θ and the generation: equal on workers in step.
    fn theta_hash(&self) -> PyResult<u64> {
        self.lock().theta_hash().map_err(to_py)
    }

    /// θ, the optimiser's moments and the generation as bytes.
    fn checkpoint<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.lock().checkpoint().map_err(to_py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Puts a `checkpoint`'s state in place.
    fn restore(&self, bytes: &[u8]) -> PyResult<()> {
        self.lock().restore_checkpoint(bytes).map_err(to_py)
    }

    /// The metric of the mean θ on all the examples.
    fn evaluate_theta(&self, py: Python<'_>) -> PyResult<f32> {
        let theta = self.lock().theta().clone();
        let (sys, ex, m) = (self.sys.clone(), self.examples.clone(), self.metric.clone());
        block(py, async move {
            hyperfunc::evaluate(&sys, &theta, &ex, &m).await
        })
    }
}
