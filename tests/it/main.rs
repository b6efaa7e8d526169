//! The one integration-test binary: a module per capability.

mod common;
mod demos;
mod errors;
mod es;
mod io;
mod population;
mod system;
