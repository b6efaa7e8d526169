//! The one integration-test binary: a module per capability.

mod bench;
mod common;
mod demos;
mod errors;
mod es;
mod io;
mod kernels;
mod observe;
mod population;
mod system;
