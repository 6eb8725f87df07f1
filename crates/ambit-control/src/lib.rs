//! Ambit's control plane.
pub mod model;
