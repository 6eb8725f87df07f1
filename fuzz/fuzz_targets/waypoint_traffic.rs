//! Arbitrary bytes as a waypoint traffic policy (`ambit.waypoint.v1.TrafficPolicy`),
//! decoded and converted the way a waypoint does, then its token buckets driven at
//! times taken from the rest of the input: never a panic, a policy that converts keeps
//! its name, and a bucket never gives more than it holds.
#![no_main]

use std::time::Duration;

use ambit_core::traffic::TokenBucket;
use ambit_proto::prost::Message;
use ambit_proto::waypoint::TrafficPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (split as usize).min(rest.len());
    let (body, times) = rest.split_at(at);
    let Ok(policy) = TrafficPolicy::decode(body) else {
        return;
    };
    let key = format!("{}/{}", policy.namespace, policy.name);
    let Ok(policy) = ambit_xds::convert::waypoint_traffic(&key, policy) else {
        return;
    };
    assert_eq!(policy.key.as_ref(), key);
    if let Some(b) = &policy.backend {
        for port in [0u16, 80, 8080, u16::MAX] {
            let _ = b.for_port(port);
        }
    }
    let Some(limit) = &policy.rate_limit else {
        return;
    };
    let specs = limit
        .bucket
        .iter()
        .chain(limit.descriptors.iter().map(|d| &d.bucket));
    for spec in specs {
        let bucket = TokenBucket::new(*spec);
        let mut now = Duration::ZERO;
        let mut taken = 0u64;
        for chunk in times.chunks(4) {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            // Time only moves forward.
            now += Duration::from_micros(u64::from(u32::from_le_bytes(b)));
            let t = bucket.take(now);
            if t.allowed {
                taken += 1;
            }
            assert!(t.remaining <= spec.max_tokens);
        }
        let fills = now.as_nanos() / spec.fill_interval.as_nanos().max(1);
        let most = u128::from(spec.max_tokens) + fills * u128::from(spec.tokens_per_fill);
        assert!(u128::from(taken) <= most, "a bucket gave more than it holds");
    }
});
