//! Systems: user code that calls hyperfunctions through a context.
//!
//! The user implements [`HyperSystem::run`] once, for one input; the engine runs it once per chunk
//! of candidates × examples, with every value carrying the population axis. [`Cx`] executes each
//! call for the whole chunk — one batched forward for a tensor function, concurrent calls for an
//! async one — and records the call graph (the DAG: calls, data dependencies and stages).
//!
//! **Control-flow invariance.** Because one `run` serves many candidates and examples, a system
//! must call the same hyperfunctions in the same order whatever the values. The engine compares
//! the call sequence of every chunk with the first and reports a divergence as an error.

use std::collections::HashMap;
use std::future::Future;
use std::panic::Location;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use candle_core::Tensor;
use futures::StreamExt;

use crate::data::{Data, Value};
use crate::error::{Error, Result, TensorContext};
use crate::function::{Body, HyperFn, Inner, IoBody, IoError, IoParams, Json};
use crate::layers::{self, Act};
use crate::observe::{RecordKind, Trace};
use crate::population::{ParamChunk, Population};
use crate::rng;
use crate::theta::Registry;

/// A system of hyperfunctions, written as ordinary async Rust.
///
/// # Examples
/// ```
/// use hyperfunc::prelude::*;
///
/// struct Xor { hidden: HyperFn, output: HyperFn }
///
/// impl HyperSystem for Xor {
///     fn hyperfunctions(&self) -> Vec<HyperFn> {
///         vec![self.hidden.clone(), self.output.clone()]
///     }
///     async fn run(&self, cx: &Cx, x: Value) -> Result<Value> {
///         let h = cx.call(&self.hidden, x).await?;
///         cx.call(&self.output, h).await
///     }
/// }
///
/// let xor = Xor {
///     hidden: HyperFn::linear("hidden", 2, 4, Activation::Tanh),
///     output: HyperFn::linear("output", 4, 1, Activation::Sigmoid),
/// };
/// assert_eq!(xor.hyperfunctions().len(), 2);
/// ```
pub trait HyperSystem: Send + Sync {
    /// Every hyperfunction the system may call (their parameters make up θ).
    fn hyperfunctions(&self) -> Vec<HyperFn>;

    /// Runs the system on one (batched) input.
    fn run(&self, cx: &Cx, input: Value) -> impl Future<Output = Result<Value>> + Send;
}

/// A system that applies hyperfunctions one after another.
///
/// # Examples
/// ```
/// use hyperfunc::{Activation, Chain, HyperFn};
/// let net = Chain::new(vec![
///     HyperFn::linear("hidden", 2, 4, Activation::Tanh),
///     HyperFn::linear("output", 4, 1, Activation::Sigmoid),
/// ]);
/// assert_eq!(net.len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct Chain {
    stages: Vec<HyperFn>,
}

impl Chain {
    /// A chain of the given functions, applied in order.
    pub fn new(stages: Vec<HyperFn>) -> Self {
        Self { stages }
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Whether the chain has no stage (it then returns its input).
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }
}

impl HyperSystem for Chain {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        self.stages.clone()
    }

    async fn run(&self, cx: &Cx, input: Value) -> Result<Value> {
        let mut v = input;
        for f in &self.stages {
            v = cx.call(f, v).await?;
        }
        Ok(v)
    }
}

/// What a DAG node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum NodeKind {
    /// A batched tensor forward.
    Tensor,
    /// A fan-out of async calls.
    Io,
    /// [`Cx::combine`].
    Combine,
    /// [`Cx::split`].
    Split,
}

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// Index in call order.
    pub id: usize,
    /// The hyperfunction (or primitive) name.
    pub function: String,
    /// What it does.
    pub kind: NodeKind,
    /// Nodes whose outputs it consumed (system inputs are not nodes).
    pub inputs: Vec<usize>,
    /// Longest path from the system input: calls of one stage do not depend on each other.
    pub stage: usize,
}

/// The call graph of one run of a system.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Dag {
    /// Nodes in call order.
    pub nodes: Vec<Node>,
}

impl Dag {
    /// Number of stages (the longest dependency chain).
    pub fn stages(&self) -> usize {
        self.nodes.iter().map(|n| n.stage).max().unwrap_or(0)
    }
}

/// Call budgets and the trace of one evaluation, shared by all its chunks.
#[derive(Default, Debug)]
pub(crate) struct Scope {
    calls: Mutex<HashMap<String, usize>>,
    pub trace: Trace,
    /// What built-in networks hoist out of their tiles, shared by the evaluation's chunks.
    pub hoist: crate::layers::HoistCache,
}

impl Scope {
    pub fn traced(trace: Trace) -> Self {
        Self {
            calls: Mutex::default(),
            trace,
            hoist: crate::layers::HoistCache::default(),
        }
    }
}

impl Scope {
    fn take(&self, function: &str, max: Option<usize>) -> Result<()> {
        let Some(max) = max else { return Ok(()) };
        let mut calls = lock(&self.calls);
        let used = calls.entry(function.to_string()).or_insert(0);
        if *used >= max {
            return Err(Error::BudgetExhausted {
                function: function.to_string(),
                max_calls: max,
            });
        }
        *used += 1;
        Ok(())
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another call panicked; the data (counters, records) stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct State {
    dag: Dag,
    forwards: usize,
    failed: Vec<bool>,
    first_error: Option<Error>,
    /// Cells (candidate-major, `P × N`) whose async calls run; `None`: all of them.
    active: Option<Arc<[bool]>>,
    /// Set by an agent loop: the chunk's call sequence repeats a data-dependent number of times.
    looped: bool,
}

/// What a finished chunk reports to the evaluator.
pub(crate) struct ChunkReport {
    pub signature: String,
    pub forwards: usize,
    pub failed: Vec<bool>,
    pub first_error: Option<Error>,
    pub dag: Dag,
}

/// The context of one run over a chunk of candidates: executes calls, records the DAG.
pub struct Cx {
    reg: Arc<Registry>,
    pop: Arc<Population>,
    scope: Arc<Scope>,
    p0: usize,
    pc: usize,
    n0: usize,
    nc: usize,
    state: Mutex<State>,
}

impl Cx {
    pub(crate) fn new(
        reg: Arc<Registry>,
        pop: Arc<Population>,
        scope: Arc<Scope>,
        (p0, pc): (usize, usize),
        (n0, nc): (usize, usize),
    ) -> Self {
        Self {
            reg,
            pop,
            scope,
            p0,
            pc,
            n0,
            nc,
            state: Mutex::new(State {
                failed: vec![false; pc],
                ..State::default()
            }),
        }
    }

    /// Number of candidates in this chunk (the `P` of every batched value).
    pub fn population(&self) -> usize {
        self.pc
    }

    /// Index of this chunk's first candidate in the whole population.
    pub fn first_candidate(&self) -> usize {
        self.p0
    }

    /// Index of this chunk's first example among all examples.
    pub fn first_example(&self) -> usize {
        self.n0
    }

    /// The device θ lives on (where inputs built inside `run` should go).
    pub fn device(&self) -> candle_core::Device {
        self.pop
            .base()
            .iter()
            .next()
            .map_or(candle_core::Device::Cpu, |(_, t)| t.device().clone())
    }

    /// Restricts async calls to the cells (candidate-major `P × N` flags) still running, as an
    /// agent loop does once some episodes or conversations have ended: a call for an inactive
    /// cell is not made and yields `null`. `None` makes every cell active again.
    pub(crate) fn set_active(&self, active: Option<Arc<[bool]>>) {
        lock(&self.state).active = active;
    }

    /// Marks this chunk's calls as the body of a loop whose length depends on the data (see
    /// [`Cx::set_active`]); the control-flow check then compares which functions are called.
    pub(crate) fn mark_loop(&self) {
        lock(&self.state).looped = true;
    }

    /// Whether the async call for (`cand`, `ex`) of a `P × n` call should be skipped.
    fn skipped(
        active: Option<&[bool]>,
        pc: usize,
        n: usize,
        cand: usize,
        ex: usize,
        per_cand: bool,
    ) -> bool {
        match active {
            Some(a) if a.len() == pc * n => {
                if per_cand {
                    !a[cand * n + ex]
                } else {
                    (0..pc).all(|c| !a[c * n + ex])
                }
            }
            _ => false,
        }
    }

    pub(crate) fn finish(&self) -> ChunkReport {
        let s = std::mem::take(&mut *lock(&self.state));
        let signature = if s.looped {
            // An agent loop runs as many steps as its episodes need, which differs between
            // chunks; what must agree is which functions the loop body calls.
            let mut seen: Vec<&str> = Vec::new();
            for n in &s.dag.nodes {
                if !seen.contains(&n.function.as_str()) {
                    seen.push(&n.function);
                }
            }
            format!("loop of {}", seen.join(", "))
        } else {
            s.dag
                .nodes
                .iter()
                .map(|n| n.function.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        ChunkReport {
            signature,
            forwards: s.forwards,
            failed: s.failed,
            first_error: s.first_error,
            dag: s.dag,
        }
    }

    fn record(&self, function: &str, kind: NodeKind, inputs: &[Option<usize>]) -> usize {
        let mut s = lock(&self.state);
        let inputs: Vec<usize> = inputs.iter().flatten().copied().collect();
        let stage = 1 + inputs
            .iter()
            .map(|&i| s.dag.nodes[i].stage)
            .max()
            .unwrap_or(0);
        let id = s.dag.nodes.len();
        s.dag.nodes.push(Node {
            id,
            function: function.to_string(),
            kind,
            inputs,
            stage,
        });
        if kind == NodeKind::Tensor {
            s.forwards += 1;
        }
        id
    }

    fn declared(&self, f: &HyperFn) -> Result<()> {
        match self.reg.functions.get(f.name()) {
            Some(g) if Arc::ptr_eq(&g.0, &f.0) => Ok(()),
            _ => Err(Error::UndeclaredFunction {
                name: f.name().to_string(),
            }),
        }
    }

    /// Parameter chunks of `f`, decoded where the parameter is bounded.
    fn params(&self, f: &Inner) -> Result<Vec<ParamChunk>> {
        f.params
            .iter()
            .map(|(name, spec)| {
                let c = self.pop.chunk(name, self.p0, self.pc)?;
                if spec.bounds().is_none() {
                    return Ok(c);
                }
                let raw = c.materialize(self.pc).at(name)?;
                Ok(ParamChunk::PerCandidate(spec.decode(&raw, name)?))
            })
            .collect()
    }

    /// Calls a hyperfunction on a value for every candidate and example of the chunk.
    #[track_caller]
    pub fn call<'a>(
        &'a self,
        f: &'a HyperFn,
        input: Value,
    ) -> impl Future<Output = Result<Value>> + Send + 'a {
        let site = Location::caller();
        // Users' own `tracing` subscribers see every call as a span (free without a subscriber).
        let span = tracing::debug_span!(
            "hyperfunc.call",
            function = %f.name(),
            candidates = self.pc,
            examples = self.nc,
            call_site = %format_args!("{}:{}", site.file(), site.line()),
        );
        async move {
            self.declared(f)?;
            let inner = &*f.0;
            match &inner.body {
                Body::Tensor(body) => {
                    let _entered = span.enter();
                    let start = self.scope.trace.now();
                    let out = self.call_tensor(inner, body.as_ref(), input);
                    self.trace_tensor(inner, start, site, out.as_ref().err());
                    out
                }
                Body::Layers(ls) => {
                    let _entered = span.enter();
                    let start = self.scope.trace.now();
                    let out = self.call_layers(inner, ls, input);
                    self.trace_tensor(inner, start, site, out.as_ref().err());
                    out
                }
                Body::Io(body) => {
                    use tracing::Instrument;
                    self.call_io(inner, body, input, site)
                        .instrument(span)
                        .await
                }
            }
        }
    }

    fn trace_tensor(
        &self,
        f: &Inner,
        start: u64,
        site: &'static Location<'static>,
        err: Option<&Error>,
    ) {
        let (cands, exs) = ((self.p0, self.p0 + self.pc), (self.n0, self.n0 + self.nc));
        self.scope.trace.call(
            &f.label,
            RecordKind::Tensor,
            start,
            cands,
            Some(exs),
            site,
            err,
            Vec::new(),
        );
    }

    fn tensor_input(&self, name: &str, input: &Value) -> Result<Act> {
        match &input.data {
            Data::Tensor { t, batched } => Ok(Act {
                t: t.clone(),
                batched: *batched,
            }),
            Data::Json { .. } => Err(Error::WrongValueKind {
                function: name.to_string(),
                expected: "a tensor input",
                actual: "JSON items",
            }),
        }
    }

    fn call_tensor(
        &self,
        f: &Inner,
        body: &(dyn Fn(&Tensor, &[Tensor]) -> candle_core::Result<Tensor> + Send + Sync),
        input: Value,
    ) -> Result<Value> {
        let name = f.name.as_str();
        let x = self.tensor_input(name, &input)?;
        let n =
            if x.batched { x.t.dim(1) } else { x.t.dim(0) }.map_err(|_| Error::ShapeMismatch {
                function: name.to_string(),
                what: "input".into(),
                expected: "[N, ..] or [P, N, ..]".into(),
                actual: x.t.dims().to_vec(),
            })?;
        let xb = if x.batched {
            x.t
        } else {
            let mut dims = vec![self.pc];
            dims.extend_from_slice(x.t.dims());
            x.t.unsqueeze(0)
                .and_then(|t| t.broadcast_as(dims))
                .and_then(|t| t.contiguous())
                .at(name)?
        };
        let thetas = self
            .params(f)?
            .iter()
            .map(|c| c.materialize(self.pc).at(name))
            .collect::<Result<Vec<_>>>()?;
        let y = body(&xb, &thetas).map_err(Error::tensor(name))?;
        let d = y.dims();
        if d.len() < 2 || d[0] != self.pc || d[1] != n {
            return Err(Error::ShapeMismatch {
                function: name.to_string(),
                what: "output".into(),
                expected: format!("[P={}, N={n}, ..]", self.pc),
                actual: d.to_vec(),
            });
        }
        let id = self.record(name, NodeKind::Tensor, &[input.node]);
        Ok(Value::batched(y).with_node(id))
    }

    fn call_layers(
        &self,
        f: &Inner,
        layers: &[crate::function::Layer],
        input: Value,
    ) -> Result<Value> {
        let name = f.name.as_str();
        let x = self.tensor_input(name, &input)?;
        let params = self.params(f)?;
        let hoist = &self.scope.hoist;
        let x = layers::forward(name, x, layers, params, self.pc, self.pop.kernel(), hoist)?;
        let id = self.record(name, NodeKind::Tensor, &[input.node]);
        let v = if x.batched {
            Value::batched(x.t)
        } else {
            Value::shared(x.t)
        };
        Ok(v.with_node(id))
    }

    async fn call_io(
        &self,
        f: &Inner,
        body: &IoBody,
        input: Value,
        site: &'static Location<'static>,
    ) -> Result<Value> {
        let name = f.name.as_str();
        let items: Vec<Json> = match &input.data {
            Data::Json { items, .. } => items.as_ref().clone(),
            Data::Tensor { t, batched } => {
                let d = t.dims();
                let rows = d.first().copied().unwrap_or(1)
                    * if *batched {
                        d.get(1).copied().unwrap_or(1)
                    } else {
                        1
                    };
                let rows = t.reshape((rows, t.elem_count() / rows.max(1)));
                let rows = rows.and_then(|r| r.to_vec2::<f32>()).at(name)?;
                rows.into_iter().map(|r| serde_json::json!(r)).collect()
            }
        };
        let in_batched = input.is_batched();
        let has_params = !f.params.is_empty();
        let out_batched = in_batched || has_params;
        let n = if in_batched {
            items.len() / self.pc.max(1)
        } else {
            items.len()
        };
        // Decoded θ per candidate, concatenated over the function's parameters.
        let mut per_cand: Vec<Vec<f32>> = vec![Vec::new(); if has_params { self.pc } else { 1 }];
        for (c, (pname, _)) in self.params(f)?.iter().zip(&f.params) {
            let rows = c
                .materialize(self.pc)
                .and_then(|t| t.flatten_from(1))
                .and_then(|t| t.to_vec2::<f32>())
                .at(pname)?;
            for (acc, r) in per_cand.iter_mut().zip(rows) {
                acc.extend(r);
            }
        }
        let prompt: Option<Arc<str>> = self
            .pop
            .base()
            .prompt(name)
            .or(f.prompt.as_deref())
            .map(Arc::from);
        let params: Vec<IoParams> = per_cand
            .into_iter()
            .map(|v| IoParams {
                values: Arc::from(v),
                prompt: prompt.clone(),
            })
            .collect();
        let jobs = if out_batched { self.pc * n } else { n };
        let active = lock(&self.state).active.clone();
        let results: Vec<Result<Json>> = futures::stream::iter(0..jobs)
            .map(|j| {
                let (cand, ex) = (j / n.max(1), j % n.max(1));
                let skip = Self::skipped(active.as_deref(), self.pc, n, cand, ex, out_batched);
                let item = if in_batched {
                    items[j].clone()
                } else {
                    items[ex].clone()
                };
                let p = params[if has_params { cand } else { 0 }].clone();
                async move {
                    if skip {
                        return Ok(Json::Null);
                    }
                    let start = self.scope.trace.now();
                    let (r, notes) = crate::observe::with_call_notes(self.attempt(
                        f,
                        body,
                        item,
                        p,
                        (self.p0 + cand) as u64,
                        ex as u64,
                    ))
                    .await;
                    let c = if out_batched { self.p0 + cand } else { self.p0 };
                    let cands = if out_batched {
                        (c, c + 1)
                    } else {
                        (self.p0, self.p0 + self.pc)
                    };
                    let e = self.n0 + ex;
                    self.scope.trace.call(
                        &f.label,
                        RecordKind::Io,
                        start,
                        cands,
                        Some((e, e + 1)),
                        site,
                        r.as_ref().err(),
                        notes,
                    );
                    r
                }
            })
            .buffered(f.policy.concurrency.max(1))
            .collect()
            .await;
        let mut out = Vec::with_capacity(jobs);
        for (j, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => out.push(v),
                Err(e) if out_batched => {
                    let mut s = lock(&self.state);
                    s.failed[j / n.max(1)] = true;
                    if s.first_error.is_none() {
                        s.first_error = Some(e);
                    }
                    out.push(Json::Null);
                }
                Err(e) => return Err(e),
            }
        }
        let id = self.record(name, NodeKind::Io, &[input.node]);
        Ok(Value::json_grid(out, out_batched, Some(id)))
    }

    /// One call with retries (retryable errors only), per-attempt timeout and the call budget.
    async fn attempt(
        &self,
        f: &Inner,
        body: &IoBody,
        item: Json,
        params: IoParams,
        cand: u64,
        ex: u64,
    ) -> Result<Json> {
        let policy = &f.policy;
        let mut attempt: u32 = 0;
        loop {
            self.scope.take(&f.name, policy.max_calls)?;
            let fut = body(item.clone(), params.clone());
            let res = match policy.timeout {
                Some(d) => match tokio::time::timeout(d, fut).await {
                    Ok(r) => r,
                    Err(_) => {
                        let e = Error::Timeout {
                            function: f.name.clone(),
                            after: d,
                        };
                        if attempt < policy.retries {
                            attempt += 1;
                            continue;
                        }
                        return Err(e);
                    }
                },
                None => fut.await,
            };
            match res {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable && attempt < policy.retries => {
                    // Exponential backoff with full jitter, deterministic per call and attempt.
                    let cap = policy.backoff.as_secs_f64() * f64::from(1u32 << attempt.min(16));
                    let u = rng::uniform(&[rng::name_hash(&f.name), cand, ex, u64::from(attempt)]);
                    tokio::time::sleep(Duration::from_secs_f64(cap * u)).await;
                    attempt += 1;
                }
                Err(IoError {
                    message,
                    unparsed: Some(output),
                    ..
                }) => {
                    return Err(Error::Parse {
                        function: f.name.clone(),
                        message,
                        output,
                    })
                }
                Err(e) => {
                    return Err(Error::Io {
                        function: f.name.clone(),
                        message: e.message,
                        retryable: e.retryable,
                    })
                }
            }
        }
    }

    /// Joins values along their last dimension (tensors) or into per-example arrays (JSON).
    pub fn combine(&self, values: &[Value]) -> Result<Value> {
        let first = values
            .first()
            .ok_or_else(|| Error::config("combine", "needs at least one value"))?;
        let batched = values.iter().any(Value::is_batched);
        let nodes: Vec<Option<usize>> = values.iter().map(|v| v.node).collect();
        let out = match &first.data {
            Data::Tensor { .. } => {
                let ts = values
                    .iter()
                    .map(|v| {
                        let t = v.as_tensor()?;
                        if batched && !v.is_batched() {
                            let mut dims = vec![self.pc];
                            dims.extend_from_slice(t.dims());
                            t.unsqueeze(0)
                                .and_then(|t| t.broadcast_as(dims))
                                .at("combine")
                        } else {
                            Ok(t.clone())
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let last = ts[0].rank() - 1;
                let t = Tensor::cat(&ts, last).map_err(|_| Error::ShapeMismatch {
                    function: "combine".into(),
                    what: "inputs".into(),
                    expected: "equal shapes except the last dimension".into(),
                    actual: ts.iter().flat_map(|t| t.dims().to_vec()).collect(),
                })?;
                if batched {
                    Value::batched(t)
                } else {
                    Value::shared(t)
                }
            }
            Data::Json { .. } => {
                let grids = values
                    .iter()
                    .map(Value::as_json)
                    .collect::<Result<Vec<_>>>()?;
                let n = first.examples(self.pc)?;
                let rows = if batched { self.pc * n } else { n };
                let items = (0..rows)
                    .map(|j| {
                        Json::Array(
                            values
                                .iter()
                                .zip(&grids)
                                .map(|(v, g)| {
                                    if v.is_batched() {
                                        g[j].clone()
                                    } else {
                                        g[j % n].clone()
                                    }
                                })
                                .collect(),
                        )
                    })
                    .collect();
                Value::json_grid(items, batched, None)
            }
        };
        let id = self.record("combine", NodeKind::Combine, &nodes);
        Ok(out.with_node(id))
    }

    /// Splits a tensor value along its last dimension into parts of the given sizes.
    pub fn split(&self, value: &Value, sizes: &[usize]) -> Result<Vec<Value>> {
        let t = value.as_tensor()?;
        let last = t.rank().saturating_sub(1);
        let total: usize = sizes.iter().sum();
        if t.dims().last() != Some(&total) {
            return Err(Error::ShapeMismatch {
                function: "split".into(),
                what: "input".into(),
                expected: format!("last dimension {total} (sum of {sizes:?})"),
                actual: t.dims().to_vec(),
            });
        }
        let id = self.record("split", NodeKind::Split, &[value.node]);
        let mut start = 0;
        sizes
            .iter()
            .map(|&s| {
                let part = t.narrow(last, start, s).at("split")?;
                start += s;
                let v = if value.is_batched() {
                    Value::batched(part)
                } else {
                    Value::shared(part)
                };
                Ok(v.with_node(id))
            })
            .collect()
    }
}

/// Runs a system once on a few examples with θ and returns its call graph.
pub async fn trace_dag<S: HyperSystem>(
    sys: &S,
    theta: &crate::theta::Theta,
    examples: &crate::data::Examples,
) -> Result<Dag> {
    let reg = Arc::new(Registry::of(sys)?);
    theta.check(&reg)?;
    let pop = Arc::new(Population::center(theta.clone()));
    let n = examples.len().min(1);
    let cx = Cx::new(reg, pop, Arc::new(Scope::default()), (0, 1), (0, n));
    let input = examples.inputs.slice_examples(0, n)?;
    sys.run(&cx, input).await?;
    Ok(cx.finish().dag)
}
