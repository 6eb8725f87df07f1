//! Identity for the mesh: the certificate authority, the workload certificate manager, and
//! the rustls configurations Ambit's components use.
//!
//! - [`ca`]: the signing side, run by the control plane.
//! - [`csr`]: certificate signing requests, both sides.
//! - [`manager`]: the node proxy side: keys generated locally, certificates requested per
//!   identity, cached and renewed before they expire.
//! - [`client`]: the gRPC client of Istio's CSR API that the manager uses.
//! - [`config`]: the one crypto provider and the rustls configurations built from it.
//! - [`spiffe`]: workload mutual TLS (HBONE): SPIFFE verification both ways.
//! - [`bundle`]: the mesh's trust anchors, replaceable at run time.

pub mod bundle;
pub mod ca;
pub mod client;
pub mod config;
pub mod csr;
pub mod manager;
pub mod spiffe;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod x509;

pub use ca::{CaError, CaOptions, CertificateAuthority, IssuedCertificate, SignError};
pub use csr::CsrError;
pub use manager::{CertHandle, CertManager, CertificateProvider, WorkloadCertificate};
