//! Arbitrary bytes as a waypoint route (`ambit.waypoint.v1.Route`), decoded and converted
//! the way a waypoint does, then used to route a request built from the rest of the
//! input: never a panic, a route that converts keeps its name, and the indexed table
//! chooses exactly as the plain scan does.
#![no_main]

use ambit_core::http_route::{RequestFacts, select};
use ambit_proto::prost::Message;
use ambit_proto::waypoint::Route;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (split as usize).min(rest.len());
    let (body, request) = rest.split_at(at);
    let Ok(route) = Route::decode(body) else {
        return;
    };
    let key = format!("{}/{}", route.namespace, route.name);
    let Ok(route) = ambit_xds::convert::waypoint_route(&key, route) else {
        return;
    };
    assert_eq!(route.key.as_ref(), key);
    let text = String::from_utf8_lossy(request);
    let mut lines = text.splitn(3, '\n');
    let method = lines.next().unwrap_or("GET");
    let path = lines.next().unwrap_or("/");
    let mut headers = http::HeaderMap::new();
    for line in lines.next().unwrap_or("").lines() {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    let facts = RequestFacts {
        method,
        path_and_query: path,
        headers: &headers,
    };
    let table = ambit_core::http_route::RouteTable::new(vec![std::sync::Arc::new(route.clone())]);
    // The route and the position of the rule in it (the table holds its own copy).
    let show = |s: ambit_core::http_route::Selected<'_>| match s {
        ambit_core::http_route::Selected::NoRoutes => "none".to_owned(),
        ambit_core::http_route::Selected::NoMatch => "404".to_owned(),
        ambit_core::http_route::Selected::Rule {
            route,
            rule,
            matched_prefix,
        } => {
            let at = route.rules.iter().position(|r| std::ptr::eq(r, rule));
            format!("{}:{at:?}:{matched_prefix:?}", route.key)
        }
    };
    for parent in &route.parents {
        for ns in ["ns", route.namespace.as_ref()] {
            let plain = show(select([&route], &parent.service, parent.port, ns, &facts));
            let indexed = show(table.select(&parent.service, parent.port, ns, &facts));
            assert_eq!(plain, indexed, "the index chose differently");
        }
    }
    for rule in &route.rules {
        let _ = ambit_core::http_route::pick_backend(&rule.backends, u32::from(split) << 24);
    }
});
