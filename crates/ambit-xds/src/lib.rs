//! Ambit's discovery client, shared by everything that follows the control plane over
//! delta xDS: the node proxy and the node agent (and, later, the waypoint).
//!
//! - [`client`]: the delta ADS stream, its reconnects and ACK/NACKs, kept in an
//!   [`ambit_core::state::Store`].
//! - [`convert`]: protobuf resources into the core model, validated.

pub mod client;
pub mod convert;
pub mod telemetry;
pub mod trace;

pub use client::{ResourceKind, XdsClient, XdsConfig, XdsState};
