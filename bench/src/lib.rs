//! Shared pieces of Ambit's benchmarks.

pub mod alloc;
pub mod harness;
