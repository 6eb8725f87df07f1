//! Arbitrary bytes as a telemetry report's metrics text, read the way the control
//! plane's console reads reports from node proxies and waypoints: the Prometheus text
//! parser never panics, and every sample it returns holds a name it was asked for.
#![no_main]

use ambit_control::console::promtext::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(samples) = parse(&text, |n| n.starts_with("istio_") || n.len() < 4) {
        for s in samples {
            assert!(s.name.starts_with("istio_") || s.name.len() < 4);
            for (k, _) in &s.labels {
                assert!(!k.is_empty());
            }
        }
    }
    let _ = parse(&text, |_| true);
});
