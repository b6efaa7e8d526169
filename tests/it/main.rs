//! The one integration-test binary: a module per capability.

mod agents;
mod bench;
mod common;
mod demos;
mod errors;
mod es;
mod eval;
#[cfg(feature = "llm")]
mod fake_openai;
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
mod system;
mod tune;
