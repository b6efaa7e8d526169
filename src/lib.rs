//! # hyperfunc
//!
//! Train compound AI systems without backpropagation. A *system* is ordinary async Rust that calls
//! *hyperfunctions*; each owns learnable parameters θ (weight matrices, small MLPs, LLM sampling
//! knobs). Evolution strategies improve all of them together against one scalar metric.
//!
//! Every value carries the population axis, so one run of the system evaluates a whole chunk of
//! candidates × examples: tensor stages are one batched forward, async stages are concurrent calls.
//!
//! # Quick start
//! ```
//! use hyperfunc::prelude::*;
//! use candle_core::{Device, Tensor};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let xor = Chain::new(vec![
//!     HyperFn::linear("hidden", 2, 4, Activation::Tanh),
//!     HyperFn::linear("output", 4, 1, Activation::Sigmoid),
//! ]);
//! let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &Device::Cpu)?;
//! let y = Tensor::new(&[[0f32], [1.], [1.], [0.]], &Device::Cpu)?;
//! let data = Examples::tensors(x, y)?;
//! let report = Es::default()
//!     .pop_size(64).sigma(0.1).lr(0.05).generations(300).seed(42)
//!     .minimize().progress(false)
//!     .optimize(&xor, &data, &metric::bce()).await?;
//! let acc = evaluate(&xor, &report.theta, &data, &metric::accuracy()).await?;
//! assert_eq!(acc, 1.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Shapes
//! Population first: a per-candidate tensor is `[P, N, ..]`, a shared one `[N, ..]`, θ of one
//! parameter across candidates `[P, ..shape]`.
#![deny(missing_docs)]

pub mod agents;
pub mod autotune;
pub mod bench;
mod data;
mod error;
pub mod es;
pub mod eval;
mod function;
mod gpu;
mod kernels;
mod layers;
#[cfg(feature = "llm")]
pub mod llm;
pub mod memory;
pub mod metric;
pub mod observe;
mod param;
mod population;
pub mod prompt;
mod rng;
pub mod runs;
mod system;
mod theta;
pub mod tune;
#[cfg(feature = "ui")]
pub mod ui;
mod util;

pub use data::{Examples, Value};
pub use error::{Error, Result};
pub use es::{
    Best, Direction, Es, EsRun, GenerationStats, Report, Schedule, Shaping, StopReason, StopSignal,
    Told, Update,
};
pub use function::{Activation, HyperFn, IoError, IoParams, Json, RuntimePolicy};
pub use metric::Metric;
pub use observe::Hub;
pub use param::{Bounds, Init, LmParams, Noise, ParamSpec};
pub use population::{
    evaluate, evaluate_population, evaluate_population_observed, Population, PopulationEval,
};
pub use system::{trace_dag, Chain, Cx, Dag, HyperSystem, Node, NodeKind};
pub use theta::Theta;

/// `#[derive(Signature)]`: a struct's doc comment and `#[input]`/`#[output]` fields as a
/// [`prompt::Signature`] (see [`prompt::HasSignature`]).
#[cfg(feature = "derive")]
pub use hyperfunc_derive::Signature;

/// Sets the number of worker threads of the CPU kernels (the global rayon pool; the
/// `HYPERFUNC_THREADS` environment variable does the same for the `hyperfunc` CLI).
///
/// Call it once, before the first evaluation: the pool cannot be resized once it exists, and a
/// later call returns [`Error::InvalidConfig`].
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidConfig {
            field: "threads".into(),
            reason: "must be at least 1".into(),
        });
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::InvalidConfig {
            field: "threads".into(),
            reason: format!(
                "the thread pool already exists ({e}); call set_threads before any evaluation"
            ),
        })
}

/// Re-exports for `use hyperfunc::prelude::*`.
pub mod prelude {
    pub use crate::metric;
    pub use crate::{
        evaluate, evaluate_population, evaluate_population_observed, Activation, Chain, Cx,
        Direction, Error, Es, Examples, Hub, HyperFn, HyperSystem, IoError, IoParams, Json,
        LmParams, Metric, ParamSpec, Population, Result, Schedule, Shaping, Theta, Update, Value,
    };
}
