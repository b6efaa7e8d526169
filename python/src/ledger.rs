//! The cost ledger from Python: the native half of `hyperfunc.Ledger` and `hyperfunc.Meter`
//! (see `hyperfunc/_ledger.py`).
//!
//! `LedgerCore` wraps a `hyperfunc::tune::Ledger` (one SQLite file, written in batches by a
//! background thread); `MeterCore` is one paid endpoint's `Meter`. A charge records the Python
//! call site (`file:function:line`), which the Python wrapper captures per code object and
//! passes in. Reports flush first, so they run with the GIL released; every Rust error becomes
//! the module's usual exception (`ConfigError` for bad input, a bad price or an unreadable
//! file, see `to_py`).

use std::path::PathBuf;

use hyperfunc::tune::{
    parse_since, CostDim, Ledger, LlmReportOptions, Meter, MeterPrice, PriceTable, Window,
};
use hyperfunc::Error;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

use crate::{from_json, to_json, to_py, ConfigError, HyperfuncError, PyHub};

/// `None`; a span back from now (`"30d"`, `"12h"`, `"2w"`); a date or time (`"2026-11-01"`,
/// `"2026-11-01T12:00"`, UTC); or Unix seconds (an int) → the first Unix second covered.
fn since_of(v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<i64>> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    if let Ok(s) = v.cast::<PyString>() {
        return parse_since(&s.to_cow()?).map(Some).map_err(to_py);
    }
    if let Ok(t) = v.extract::<i64>() {
        return Ok(Some(t));
    }
    Err(PyTypeError::new_err(format!(
        "since must be None, a span such as \"30d\", a date such as \"2026-11-01\" or Unix \
         seconds (int), not {}",
        v.get_type().name()?
    )))
}

/// A list of dimension names (or one comma-separated string) → dimensions.
fn dims_of(by: &Bound<'_, PyAny>) -> PyResult<Vec<CostDim>> {
    let names: Vec<String> = if let Ok(s) = by.extract::<String>() {
        s.split(',')
            .filter(|d| !d.trim().is_empty())
            .map(str::to_string)
            .collect()
    } else {
        by.extract().map_err(|_| {
            PyTypeError::new_err(
                "by must be a list of dimension names (caller, endpoint, model, label, run, \
                 user, day) or one comma-separated string",
            )
        })?
    };
    names
        .iter()
        .map(|n| CostDim::parse(n).map_err(to_py))
        .collect()
}

/// A price table: JSON text (an array), a list of entries (dicts), or a file path.
fn table_of(py: Python<'_>, prices: &Bound<'_, PyAny>) -> PyResult<PriceTable> {
    if prices.is_instance_of::<PyList>() || prices.is_instance_of::<PyTuple>() {
        let text = serde_json::to_string(&to_json(prices)?)
            .map_err(|e| HyperfuncError::new_err(e.to_string()))?;
        return PriceTable::from_json(&text).map_err(to_py);
    }
    if let Ok(s) = prices.cast::<PyString>() {
        let s = s.to_cow()?.into_owned();
        if s.trim_start().starts_with('[') {
            return PriceTable::from_json(&s).map_err(to_py);
        }
        return py.detach(|| PriceTable::load(&s)).map_err(to_py);
    }
    let path: PathBuf = prices.extract().map_err(|_| {
        PyTypeError::new_err(
            "prices must be JSON text, a list of {model, from, input, output, cache_read?, \
             cache_write?} dicts or the path of a JSON price table",
        )
    })?;
    py.detach(|| PriceTable::load(&path)).map_err(to_py)
}

/// Any serialisable report as JSON-like Python values.
macro_rules! to_python {
    ($py:expr, $v:expr) => {{
        let j = serde_json::to_value($v).map_err(|e| HyperfuncError::new_err(e.to_string()))?;
        from_json($py, &j)
    }};
}

/// The ledger behind a `hyperfunc.Ledger` (or a `LedgerCore`), for `LlmClient.attach_ledger`.
pub(crate) fn ledger_of(v: &Bound<'_, PyAny>) -> PyResult<Ledger> {
    if let Ok(c) = v.cast::<PyLedgerCore>() {
        return Ok(c.get().ledger.clone());
    }
    if let Ok(inner) = v.getattr(pyo3::intern!(v.py(), "_core")) {
        if let Ok(c) = inner.cast::<PyLedgerCore>() {
            return Ok(c.get().ledger.clone());
        }
    }
    Err(PyTypeError::new_err(format!(
        "expected a hyperfunc.Ledger, not {}",
        v.get_type().name()?
    )))
}

/// The native half of `hyperfunc.Ledger`: one ledger file.
#[pyclass(name = "LedgerCore", module = "hyperfunc", frozen)]
pub struct PyLedgerCore {
    ledger: Ledger,
}

#[pymethods]
impl PyLedgerCore {
    /// Opens (or creates) the ledger at `path` (`":memory:"` for a private in-memory one).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let ledger = py.detach(|| Ledger::open(&path)).map_err(to_py)?;
        Ok(Self { ledger })
    }

    /// The file.
    #[getter]
    fn path(&self) -> &str {
        self.ledger.path()
    }

    /// A meter for `endpoint`: exactly one of `per_call` (dollars), `per_unit`
    /// (`(unit, dollars)`) or `from_response=True`.
    #[pyo3(signature = (endpoint, *, per_call=None, per_unit=None, from_response=false))]
    fn meter(
        &self,
        endpoint: &str,
        per_call: Option<f64>,
        per_unit: Option<(String, f64)>,
        from_response: bool,
    ) -> PyResult<PyMeterCore> {
        let price = match (per_call, per_unit, from_response) {
            (Some(usd), None, false) => MeterPrice::per_call_usd(usd),
            (None, Some((unit, usd)), false) => MeterPrice::per_unit_usd(&unit, usd),
            (None, None, true) => Ok(MeterPrice::FromResponse),
            _ => {
                return Err(ConfigError::new_err(format!(
                    "meter `{endpoint}`: give exactly one of per_call=dollars, \
                     per_unit=(unit, dollars) or from_response=True"
                )))
            }
        }
        .map_err(|e| match e {
            Error::Price { what, reason } => to_py(Error::Price {
                what: format!("{what} of meter `{endpoint}`"),
                reason,
            }),
            other => to_py(other),
        })?;
        Ok(PyMeterCore {
            meter: Meter::new(&self.ledger, endpoint, price),
            endpoint: endpoint.to_string(),
        })
    }

    /// Waits until everything recorded so far is written.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.ledger.flush()).map_err(to_py)
    }

    /// Prices LLM calls with this table from now on (JSON text, a list of entries or a path).
    fn set_prices(&self, py: Python<'_>, prices: &Bound<'_, PyAny>) -> PyResult<()> {
        let table = table_of(py, prices)?;
        self.ledger.set_prices(table);
        Ok(())
    }

    /// The current price table, as a list of entries.
    fn prices<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_python!(py, &self.ledger.prices().entries())
    }

    /// The cost report as a dict (`per_call=True`: from the per-call rows, to the second).
    #[pyo3(signature = (by, since=None, per_call=false))]
    fn cost_report<'py>(
        &self,
        py: Python<'py>,
        by: &Bound<'py, PyAny>,
        since: Option<&Bound<'py, PyAny>>,
        per_call: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let r = self.report(py, by, since, per_call)?;
        to_python!(py, &r)
    }

    /// The cost report as a Markdown table.
    #[pyo3(signature = (by, since=None, per_call=false))]
    fn cost_table<'py>(
        &self,
        py: Python<'py>,
        by: &Bound<'py, PyAny>,
        since: Option<&Bound<'py, PyAny>>,
        per_call: bool,
    ) -> PyResult<String> {
        Ok(self.report(py, by, since, per_call)?.to_table())
    }

    /// Re-prices the stored LLM calls; `(calls, micros_before, micros_after)`.
    #[pyo3(signature = (prices, since=None))]
    fn reprice(
        &self,
        py: Python<'_>,
        prices: &Bound<'_, PyAny>,
        since: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(u64, i64, i64)> {
        let table = table_of(py, prices)?;
        let since = since_of(since)?;
        py.detach(|| self.ledger.reprice(&table, since))
            .map_err(to_py)
    }

    /// Stored LLM calls as dicts, oldest first.
    #[pyo3(signature = (since=None))]
    fn llm_calls<'py>(
        &self,
        py: Python<'py>,
        since: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let since = since_of(since)?;
        let calls = py.detach(|| self.ledger.llm_calls(since)).map_err(to_py)?;
        to_python!(py, &calls)
    }

    /// The LLM report as a dict.
    #[pyo3(signature = (since=None, min_cacheable_tokens=1024, cache_lifetime_s=300.0, top=10))]
    fn llm_report<'py>(
        &self,
        py: Python<'py>,
        since: Option<&Bound<'py, PyAny>>,
        min_cacheable_tokens: u64,
        cache_lifetime_s: f64,
        top: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = report_options(since, min_cacheable_tokens, cache_lifetime_s, top)?;
        let r = py.detach(|| self.ledger.llm_report(&opts)).map_err(to_py)?;
        to_python!(py, &r)
    }

    /// The LLM report as Markdown.
    #[pyo3(signature = (since=None, min_cacheable_tokens=1024, cache_lifetime_s=300.0, top=10))]
    fn llm_report_markdown(
        &self,
        py: Python<'_>,
        since: Option<&Bound<'_, PyAny>>,
        min_cacheable_tokens: u64,
        cache_lifetime_s: f64,
        top: usize,
    ) -> PyResult<String> {
        let opts = report_options(since, min_cacheable_tokens, cache_lifetime_s, top)?;
        let r = py.detach(|| self.ledger.llm_report(&opts)).map_err(to_py)?;
        Ok(r.to_markdown())
    }

    /// Compares the LLM calls of two windows; a dict.
    #[pyo3(signature = (before, after, label=None))]
    fn compare<'py>(
        &self,
        py: Python<'py>,
        before: &str,
        after: &str,
        label: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.comparison(py, before, after, label)?;
        to_python!(py, &c)
    }

    /// Compares the LLM calls of two windows; a Markdown table.
    #[pyo3(signature = (before, after, label=None))]
    fn compare_table(
        &self,
        py: Python<'_>,
        before: &str,
        after: &str,
        label: Option<&str>,
    ) -> PyResult<String> {
        Ok(self.comparison(py, before, after, label)?.to_table())
    }

    /// Records the quality of a stored LLM call.
    fn quality(&self, py: Python<'_>, call_id: i64, quality: f64) -> PyResult<()> {
        py.detach(|| self.ledger.quality(call_id, quality))
            .map_err(to_py)
    }

    /// Sends every `observe` record of `hub` to this ledger from now on.
    fn attach(&self, hub: PyRef<'_, PyHub>) {
        self.ledger.attach(&hub.0);
    }

    fn __repr__(&self) -> String {
        format!("Ledger({:?})", self.ledger.path())
    }
}

fn report_options(
    since: Option<&Bound<'_, PyAny>>,
    min_cacheable_tokens: u64,
    cache_lifetime_s: f64,
    top: usize,
) -> PyResult<LlmReportOptions> {
    if !(cache_lifetime_s.is_finite() && cache_lifetime_s >= 0.0) {
        return Err(ConfigError::new_err(format!(
            "cache_lifetime_s must be finite and not negative, got {cache_lifetime_s}"
        )));
    }
    Ok(LlmReportOptions {
        since: since_of(since)?,
        min_cacheable_tokens,
        cache_lifetime_s,
        top,
    })
}

impl PyLedgerCore {
    fn report(
        &self,
        py: Python<'_>,
        by: &Bound<'_, PyAny>,
        since: Option<&Bound<'_, PyAny>>,
        per_call: bool,
    ) -> PyResult<hyperfunc::tune::CostReport> {
        let dims = dims_of(by)?;
        let since = since_of(since)?;
        py.detach(|| {
            if per_call {
                self.ledger.cost_by_calls(&dims, since)
            } else {
                self.ledger.cost_report(&dims, since)
            }
        })
        .map_err(to_py)
    }

    fn comparison(
        &self,
        py: Python<'_>,
        before: &str,
        after: &str,
        label: Option<&str>,
    ) -> PyResult<hyperfunc::tune::Comparison> {
        let before: Window = before.parse().map_err(to_py)?;
        let after: Window = after.parse().map_err(to_py)?;
        py.detach(|| self.ledger.compare(&before, &after, label))
            .map_err(to_py)
    }
}

/// The native half of `hyperfunc.Meter`: one paid endpoint and its price.
#[pyclass(name = "MeterCore", module = "hyperfunc", frozen)]
pub struct PyMeterCore {
    meter: Meter,
    endpoint: String,
}

#[pymethods]
impl PyMeterCore {
    /// The endpoint's name.
    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Records one call made at `site` (`(file, function)`) line `line`, or at `call_site`
    /// when given; returns the micro-dollars charged.
    #[pyo3(signature = (site, line, label=None, run=None, user=None, model=None, units=None,
                        usd=None, call_site=None))]
    #[allow(clippy::too_many_arguments)]
    fn charge(
        &self,
        site: &Bound<'_, PyAny>,
        line: u32,
        label: Option<&str>,
        run: Option<&str>,
        user: Option<&str>,
        model: Option<&str>,
        units: Option<f64>,
        usd: Option<f64>,
        call_site: Option<&str>,
    ) -> PyResult<i64> {
        let at = match call_site {
            Some(s) => s.to_string(),
            None => match site.extract::<(String, String)>() {
                Ok((file, function)) => format!("{file}:{function}:{line}"),
                Err(_) => format!("<python>:{line}"),
            },
        };
        let mut c = self.meter.charge().call_site(&at);
        if let Some(v) = label {
            c = c.label(v);
        }
        if let Some(v) = run {
            c = c.run(v);
        }
        if let Some(v) = user {
            c = c.user(v);
        }
        if let Some(v) = model {
            c = c.model(v);
        }
        if let Some(v) = units {
            c = c.units(v);
        }
        if let Some(v) = usd {
            c = c.usd(v);
        }
        c.record().map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!("Meter({:?})", self.endpoint)
    }
}
