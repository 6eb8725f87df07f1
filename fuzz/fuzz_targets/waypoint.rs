//! What a waypoint reads from untrusted parties: the first bytes of a tunnel (protocol
//! detection), a request path (normalization), a request's headers against policies,
//! and a waypoint policy resource from discovery. Never a panic; a normalized path is
//! stable (normalizing it again changes nothing) and never climbs above the root.
#![no_main]

use ambit_core::policy::{Connection, HeaderMatch, Match, Request, RequestHeaders, StringMatch};
use ambit_proto::prost::Message;
use ambit_waypoint::headers::normalize_path;
use ambit_waypoint::serve::classify;
use ambit_xds::convert::{self, Interner};
use libfuzzer_sys::fuzz_target;

struct Raw<'a>(&'a str);

impl RequestHeaders for Raw<'_> {
    fn header(&self, _: &str) -> Option<String> {
        Some(self.0.to_owned())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let _ = classify(body);
        }
        1 => {
            let text = String::from_utf8_lossy(body);
            if let Ok(p) = normalize_path(&text) {
                let path = p.split_once('?').map_or(p.as_str(), |(p, _)| p);
                assert!(path == "*" || path.starts_with('/'), "{p:?}");
                assert!(!path.split('/').any(|s| s == ".." || s == "."), "{p:?}");
                assert_eq!(normalize_path(&p).as_deref(), Ok(p.as_str()), "stable");
                // A policy reading the path and a header never panics.
                let m = Match {
                    paths: vec![StringMatch::parse(path)],
                    headers: vec![HeaderMatch {
                        name: "x".into(),
                        values: vec![StringMatch::parse(&text)],
                        not_values: Vec::new(),
                    }],
                    hosts: vec![StringMatch::parse(&text)],
                    ..Match::default()
                };
                let headers = Raw(&text);
                let c = Connection {
                    source_ip: [198, 18, 0, 1].into(),
                    source_principal: None,
                    source_principal_aliases: &[],
                    source_namespace: None,
                    source_service_account: None,
                    destination_ip: [198, 18, 0, 2].into(),
                    destination_port: 80,
                    request: Some(Request {
                        method: "GET",
                        host: &text,
                        path: &p,
                        headers: &headers,
                        remote_ip: [198, 18, 0, 1].into(),
                    }),
                };
                let _ = m.matches(&c);
            }
        }
        _ => {
            if let Ok(p) = ambit_proto::waypoint::Policy::decode(body) {
                let name = format!("{}/{}", p.namespace, p.name);
                let mut i = Interner::default();
                if let Ok(a) = convert::waypoint_policy(&name, p, &mut i) {
                    assert_eq!(a.key(), name);
                    assert!(!a.targets.is_empty() && a.targets.len() <= convert::MAX_TARGETS);
                }
            }
        }
    }
});
