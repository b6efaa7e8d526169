//! The one integration-test binary: a module per capability.

mod agents;
mod autotune;
mod bench;
mod chart;
mod common;
mod demos;
mod errors;
mod es;
mod eval;
#[cfg(feature = "llm")]
mod fake_openai;
#[cfg(feature = "cuda")]
mod gpu;
mod io;
mod kernels;
#[cfg(feature = "llm")]
mod llm;
mod memory;
mod observe;
#[cfg(all(feature = "otlp", feature = "llm"))]
mod otlp;
mod population;
#[cfg(all(feature = "llm", feature = "derive"))]
mod prompt;
mod runs;
#[cfg(feature = "llm")]
mod runs_ask;
mod shard;
mod system;
mod tune;
#[cfg(feature = "llm")]
mod tune_cost;
#[cfg(feature = "llm")]
mod tune_judge;
#[cfg(all(feature = "ui", feature = "llm"))]
mod ui;
