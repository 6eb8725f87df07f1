//! The mesh certificate authority: holds the signing key and issues workload certificates.
//!
//! Two ways to hold the signing key:
//! - **self-signed** ([`CertificateAuthority::load_or_create`]): on first start a root
//!   (ECDSA P-256) is generated in the state folder (`root-cert.pem`, `root-key.pem` with
//!   mode 0600) and reused on every later start; leaves are signed by the root directly.
//! - **plug-in** ([`CertificateAuthority::load_plugin`]): the operator supplies an
//!   intermediate in Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`,
//!   `cert-chain.pem`, `root-cert.pem`); leaves are signed by the intermediate and carry
//!   the chain up to the supplied root.
//!
//! Either way the key material is checked on load: a key that does not match its
//! certificate, a certificate that is not a CA, or a chain that does not lead to the root
//! is a start-up error naming the file and what to do.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ambit_core::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::csr::{CsrError, parse_csr};
use crate::x509::{self, CertInfo};

/// File names of the self-signed root inside the CA state folder.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// File names of a plug-in CA folder (Istio's `cacerts` secret layout).
pub const PLUGIN_CA_CERT: &str = "ca-cert.pem";
pub const PLUGIN_CA_KEY: &str = "ca-key.pem";
pub const PLUGIN_CERT_CHAIN: &str = "cert-chain.pem";
pub const PLUGIN_ROOT_CERT: &str = "root-cert.pem";

/// Lifetime of a generated root.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are valid from slightly in the past so a peer whose clock is a little behind
/// still accepts them.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);
/// Largest certificate file the CA reads.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Limits on what the CA issues.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The trust domain of every identity this CA signs.
    pub trust_domain: String,
    /// Lifetime given when a request asks for none.
    pub default_ttl: Duration,
    /// The longest lifetime issued; longer requests are capped.
    pub max_ttl: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: ambit_core::DEFAULT_TRUST_DOMAIN.to_owned(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// A certificate authority ready to sign.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// PEM certificates following an issued leaf: the signing certificate first, the root last.
    chain_pem: Vec<String>,
    /// The trust anchor(s) certificates chain to.
    roots: Vec<CertificateDer<'static>>,
    options: CaOptions,
    kind: CaKind,
}

/// Where the signing key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    SelfSigned,
    Plugin,
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// PEM certificates, leaf first and root last: the `cert_chain` of Istio's CSR API.
    pub chain_pem: Vec<String>,
    /// The leaf in DER.
    pub leaf: CertificateDer<'static>,
    /// Serial number as lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Names put into a server certificate (the control plane's own).
#[derive(Debug, Clone, Default)]
pub struct ServerNames {
    pub identity: Option<SpiffeId>,
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_PEM_FILE} bytes; is it the right file?")]
    TooLarge { path: PathBuf },
    #[error("{path}: {what}")]
    BadFile { path: PathBuf, what: String },
    #[error(
        "found {present} but not {missing} in {dir}: restore the missing file, or move both away to let Ambit create a new root (every workload certificate then changes)"
    )]
    HalfRoot {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error(
        "{key} does not match the public key of {cert}: the key material is mixed up; supply the key that belongs to the certificate"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{path} is not a CA certificate (it needs basicConstraints CA:TRUE and keyCertSign)")]
    NotCa { path: PathBuf },
    #[error(
        "{path} is not valid now (valid from {not_before} to {not_after}); install a current certificate"
    )]
    Expired {
        path: PathBuf,
        not_before: String,
        not_after: String,
    },
    #[error(
        "the plug-in chain does not verify: a certificate issued by {cert} does not chain through {chain} to {root}: {reason}"
    )]
    ChainBroken {
        cert: PathBuf,
        chain: PathBuf,
        root: PathBuf,
        reason: String,
    },
    #[error("the CA key must be ECDSA P-256 or P-384, RSA or Ed25519 ({path}): {reason}")]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the trust domain {0:?} is not valid")]
    TrustDomain(String),
}

/// Why a request could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("identity {identity} is outside this CA's trust domain {trust_domain}")]
    TrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("key handling failed: {0}")]
    Key(String),
}

impl CertificateAuthority {
    /// Loads the self-signed root from `dir`, creating it (and `dir`) on first start.
    pub fn load_or_create(dir: &Path, options: CaOptions) -> Result<Self, CaError> {
        check_trust_domain(&options)?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load_root(&cert_path, &key_path, options),
            (false, false) => Self::create_root(dir, &cert_path, &key_path, options),
            (true, false) => Err(CaError::HalfRoot {
                dir: dir.to_owned(),
                present: ROOT_CERT_FILE,
                missing: ROOT_KEY_FILE,
            }),
            (false, true) => Err(CaError::HalfRoot {
                dir: dir.to_owned(),
                present: ROOT_KEY_FILE,
                missing: ROOT_CERT_FILE,
            }),
        }
    }

    /// Loads an operator-supplied intermediate in Istio's `cacerts` layout from `dir`.
    pub fn load_plugin(dir: &Path, options: CaOptions) -> Result<Self, CaError> {
        check_trust_domain(&options)?;
        let cert_path = dir.join(PLUGIN_CA_CERT);
        let key_path = dir.join(PLUGIN_CA_KEY);
        let chain_path = dir.join(PLUGIN_CERT_CHAIN);
        let root_path = dir.join(PLUGIN_ROOT_CERT);

        warn_if_key_readable_by_others(&key_path);
        let ca_cert = read_one_cert(&cert_path)?;
        let key = read_key(&key_path)?;
        let chain = read_certs(&chain_path, true)?;
        let root = read_one_cert(&root_path)?;

        check_signing_cert(&cert_path, &ca_cert, &key, &key_path)?;
        let root_info = inspect_file(&root_path, &root)?;
        if !root_info.is_ca {
            return Err(CaError::NotCa { path: root_path });
        }
        check_current(&root_path, &root_info)?;

        // The chain that follows an issued leaf: ca-cert, then the intermediates listed in
        // cert-chain.pem (Istio's file usually starts with ca-cert itself and may end with
        // the root; neither is repeated), then the root.
        let mut following: Vec<CertificateDer<'static>> = vec![ca_cert.clone()];
        for cert in chain {
            if cert != ca_cert && cert != root && !following.contains(&cert) {
                following.push(cert);
            }
        }
        for (i, cert) in following.iter().enumerate().skip(1) {
            let info = inspect_file(&chain_path, cert)?;
            if !info.is_ca {
                return Err(CaError::BadFile {
                    path: chain_path.clone(),
                    what: format!("certificate #{i} of the chain is not a CA certificate"),
                });
            }
        }
        let intermediates = following.clone();
        following.push(root.clone());

        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| CaError::BadFile {
            path: cert_path.clone(),
            what: format!("cannot use it as an issuer: {e}"),
        })?;
        let ca = Self {
            issuer,
            chain_pem: following.iter().map(to_pem).collect(),
            roots: vec![root],
            options,
            kind: CaKind::Plugin,
        };

        // Prove the whole chain end to end: issue a throwaway leaf and verify it against the
        // supplied root the way a peer will.
        let probe_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let probe_id = SpiffeId::new(ca.options.trust_domain.clone(), "ambit-probe", "probe")
            .map_err(|_| CaError::TrustDomain(ca.options.trust_domain.clone()))?;
        let probe = ca
            .issue(
                &probe_key,
                &ServerNames {
                    identity: Some(probe_id),
                    ..ServerNames::default()
                },
                Duration::from_secs(300),
            )
            .map_err(|e| CaError::BadFile {
                path: cert_path.clone(),
                what: e.to_string(),
            })?;
        x509::verify_leaf(&probe.leaf, &intermediates, &ca.roots, SystemTime::now()).map_err(
            |reason| CaError::ChainBroken {
                cert: cert_path,
                chain: chain_path,
                root: root_path,
                reason,
            },
        )?;
        Ok(ca)
    }

    fn load_root(cert_path: &Path, key_path: &Path, options: CaOptions) -> Result<Self, CaError> {
        warn_if_key_readable_by_others(key_path);
        let cert = read_one_cert(cert_path)?;
        let key = read_key(key_path)?;
        check_signing_cert(cert_path, &cert, &key, key_path)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::BadFile {
            path: cert_path.to_owned(),
            what: format!("cannot use it as an issuer: {e}"),
        })?;
        Ok(Self {
            issuer,
            chain_pem: vec![to_pem(&cert)],
            roots: vec![cert],
            options,
            kind: CaKind::SelfSigned,
        })
    }

    fn create_root(
        dir: &Path,
        cert_path: &Path,
        key_path: &Path,
        options: CaOptions,
    ) -> Result<Self, CaError> {
        create_private_dir(dir)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, options.trust_domain.clone());
        // A per-root suffix keeps two meshes' roots apart by name, so a certificate from
        // the other one reads as "unknown issuer" rather than "bad signature".
        let tag = random_serial().to_bytes();
        dn.push(
            DnType::CommonName,
            format!("Ambit Root CA {}", hex(&tag[..4])),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;

        write_new_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new_file(cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "created a new mesh root certificate authority");

        let der = cert.der().clone();
        let issuer = Issuer::new(params, key);
        Ok(Self {
            issuer,
            chain_pem: vec![to_pem(&der)],
            roots: vec![der],
            options,
            kind: CaKind::SelfSigned,
        })
    }

    /// Signs a workload certificate for `identity` over the public key of `csr_pem`.
    ///
    /// Only the CSR's public key (ECDSA P-256) is used; everything else it asks for is
    /// ignored. `requested` is capped by [`CaOptions::max_ttl`]; `None` or zero means the
    /// default lifetime.
    pub fn sign_csr(
        &self,
        csr_pem: &[u8],
        identity: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<IssuedCertificate, SignError> {
        let key = parse_csr(csr_pem)?;
        if identity.trust_domain() != self.options.trust_domain {
            return Err(SignError::TrustDomain {
                identity: identity.clone(),
                trust_domain: self.options.trust_domain.clone(),
            });
        }
        let ttl = self.ttl_for(requested);
        self.issue(
            &key,
            &ServerNames {
                identity: Some(identity.clone()),
                ..ServerNames::default()
            },
            ttl,
        )
    }

    /// The lifetime given for a requested one.
    pub fn ttl_for(&self, requested: Option<Duration>) -> Duration {
        match requested {
            None => self.options.default_ttl,
            Some(d) if d.is_zero() => self.options.default_ttl,
            Some(d) => d.min(self.options.max_ttl),
        }
    }

    /// Issues a leaf over `public_key` with the given names, valid for `ttl`.
    pub fn issue(
        &self,
        public_key: &impl PublicKeyData,
        names: &ServerNames,
        ttl: Duration,
    ) -> Result<IssuedCertificate, SignError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(id) = &names.identity {
            params.subject_alt_names.push(SanType::URI(
                id.to_string()
                    .try_into()
                    .map_err(|_| SignError::Sign(rcgen::Error::CouldNotParseCertificate))?,
            ));
        }
        for dns in &names.dns {
            params.subject_alt_names.push(SanType::DnsName(
                dns.clone().try_into().map_err(SignError::Sign)?,
            ));
        }
        for ip in &names.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_before = now - CLOCK_SKEW_ALLOWANCE;
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let serial = random_serial();
        let serial_hex = hex(serial.as_ref());
        params.serial_number = Some(serial);
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain_pem = Vec::with_capacity(self.chain_pem.len() + 1);
        chain_pem.push(cert.pem());
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(IssuedCertificate {
            chain_pem,
            leaf: cert.der().clone(),
            serial: serial_hex,
            // The encoded times have whole-second precision.
            not_before: truncate_to_seconds(not_before),
            not_after: truncate_to_seconds(not_after),
        })
    }

    /// The trust anchors every issued certificate chains to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trust anchors as one PEM bundle (what clients should trust).
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(to_pem).collect()
    }

    /// Certificates between an issued leaf and the root (exclusive of both).
    pub fn intermediates(&self) -> Vec<CertificateDer<'static>> {
        let n = self.chain_pem.len().saturating_sub(1);
        self.chain_pem[..n]
            .iter()
            .filter_map(|p| CertificateDer::from_pem_slice(p.as_bytes()).ok())
            .filter(|c| !self.roots.contains(c))
            .collect()
    }

    pub fn options(&self) -> &CaOptions {
        &self.options
    }

    pub fn kind(&self) -> CaKind {
        self.kind
    }
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints key material.
        f.debug_struct("CertificateAuthority")
            .field("kind", &self.kind)
            .field("trust_domain", &self.options.trust_domain)
            .field("chain_len", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

fn check_trust_domain(options: &CaOptions) -> Result<(), CaError> {
    if ambit_core::identity::is_trust_domain(&options.trust_domain) {
        Ok(())
    } else {
        Err(CaError::TrustDomain(options.trust_domain.clone()))
    }
}

/// Checks that `cert` is a current CA certificate and that `key` is its key.
fn check_signing_cert(
    cert_path: &Path,
    cert: &CertificateDer<'_>,
    key: &KeyPair,
    key_path: &Path,
) -> Result<(), CaError> {
    let info = inspect_file(cert_path, cert)?;
    if info.spki_der != key.subject_public_key_info() {
        return Err(CaError::KeyMismatch {
            key: key_path.to_owned(),
            cert: cert_path.to_owned(),
        });
    }
    if !info.is_ca || !info.can_sign_certs {
        return Err(CaError::NotCa {
            path: cert_path.to_owned(),
        });
    }
    check_current(cert_path, &info)
}

fn check_current(path: &Path, info: &CertInfo) -> Result<(), CaError> {
    let now = SystemTime::now();
    if now < info.not_before || now > info.not_after {
        return Err(CaError::Expired {
            path: path.to_owned(),
            not_before: humantime_rfc3339(info.not_before),
            not_after: humantime_rfc3339(info.not_after),
        });
    }
    Ok(())
}

fn inspect_file(path: &Path, cert: &CertificateDer<'_>) -> Result<CertInfo, CaError> {
    x509::inspect(cert).map_err(|what| CaError::BadFile {
        path: path.to_owned(),
        what,
    })
}

fn read_limited(path: &Path) -> Result<Vec<u8>, CaError> {
    let meta = fs::metadata(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > MAX_PEM_FILE {
        return Err(CaError::TooLarge {
            path: path.to_owned(),
        });
    }
    fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads every certificate of a PEM file; at least one unless `allow_empty`.
fn read_certs(path: &Path, allow_empty: bool) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bytes = read_limited(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadFile {
            path: path.to_owned(),
            what: format!("not valid PEM: {e}"),
        })?;
    for cert in &certs {
        // Reject anything that is not a parseable X.509 certificate now, not at first use.
        X509Certificate::from_der(cert).map_err(|e| CaError::BadFile {
            path: path.to_owned(),
            what: format!("not an X.509 certificate: {e}"),
        })?;
    }
    if certs.is_empty() && !allow_empty {
        return Err(CaError::BadFile {
            path: path.to_owned(),
            what: "contains no PEM CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn read_one_cert(path: &Path) -> Result<CertificateDer<'static>, CaError> {
    let mut certs = read_certs(path, false)?;
    if certs.len() > 1 {
        return Err(CaError::BadFile {
            path: path.to_owned(),
            what: format!("expected one certificate, found {}", certs.len()),
        });
    }
    Ok(certs.remove(0))
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let bytes = read_limited(path)?;
    let der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| CaError::BadFile {
        path: path.to_owned(),
        what: format!("no usable PEM private key: {e}"),
    })?;
    KeyPair::try_from(&der).map_err(|e| CaError::UnsupportedKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn warn_if_key_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the CA key is readable by other users; run chmod 600 on it"
        );
    }
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Writes a file that must not exist yet, with `mode`, durably.
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The system's random source never fails on Linux once the kernel is seeded; fall
    // back to fastrand rather than panic so a serial is always produced.
    if ambit_core::crypto::fill_random(&mut bytes).is_err() {
        bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PEM encoding of one certificate.
pub fn to_pem(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()))
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

/// RFC 3339 text of a time, for messages.
pub fn humantime_rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests;
