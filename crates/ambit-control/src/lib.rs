//! Ambit's control plane.
pub mod model;
pub mod source;
