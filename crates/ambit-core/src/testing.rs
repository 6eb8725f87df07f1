//! Builders for unit tests of the crates that read discovery state (feature `testing`).

use std::sync::Arc;

use crate::discovery::*;

pub fn s(v: &str) -> Str {
    v.into()
}

pub fn workload(
    name: &str,
    ip: &str,
    node: &str,
    zone: &str,
    tunnel: TunnelProtocol,
    services: &[(&str, u16, u16)],
) -> Workload {
    Workload {
        uid: s(name),
        name: s(name),
        workload_name: s(name),
        node: s(node),
        addresses: vec![ip.parse().expect("a test address")].into(),
        tunnel,
        status: Health::Healthy,
        native_tunnel: false,
        locality: Some(Arc::new(Locality {
            region: s("r"),
            zone: s(zone),
            subzone: s(""),
        })),
        waypoint: None,
        profile: Arc::new(WorkloadProfile {
            namespace: s("demo"),
            network: s(""),
            trust_domain: s("cluster.local"),
            service_account: s("sa"),
            canonical_name: s(name),
            canonical_revision: s("v1"),
            cluster_id: s("Kubernetes"),
            workload_type: WorkloadType::Pod,
            network_mode: NetworkMode::Standard,
            services: services
                .iter()
                .map(|(k, sp, tp)| {
                    (
                        s(k),
                        vec![PortMapping {
                            service_port: *sp,
                            target_port: *tp,
                        }]
                        .into(),
                    )
                })
                .collect(),
            authorization_policies: Box::new([]),
            l7_metrics: false,
        }),
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An Ed25519 JWT signer and its key set, to mint tokens in tests.
pub struct JwtSigner {
    pair: crate::crypto::signature::Ed25519KeyPair,
    pub kid: String,
}

impl JwtSigner {
    pub fn new(kid: &str) -> Self {
        let doc = crate::crypto::signature::Ed25519KeyPair::generate_pkcs8(
            &crate::crypto::rand::SystemRandom::new(),
        )
        .expect("the system's random source works");
        JwtSigner {
            pair: crate::crypto::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
                .expect("a key just generated reads back"),
            kid: kid.into(),
        }
    }

    pub fn jwks(&self) -> String {
        use crate::crypto::signature::KeyPair;
        serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": self.kid,
            "x": b64(self.pair.public_key().as_ref())}]})
        .to_string()
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "kid": self.kid});
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.pair.sign(signed.as_bytes());
        format!("{signed}.{}", b64(sig.as_ref()))
    }
}
