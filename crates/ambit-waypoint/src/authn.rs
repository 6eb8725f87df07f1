//! RequestAuthentication at the waypoint: a request's JSON Web Token is checked by the
//! rules of every RequestAuthentication bound to the service it is addressed to or to
//! this waypoint ([`ambit_core::jwt::authenticate`]), before authorization reads it.
//!
//! Istio's semantics: a request without a token passes unauthenticated (an
//! AuthorizationPolicy demands one with `requestPrincipals`); a token that is there and
//! not valid (bad signature, expired, wrong audience, an issuer no rule names, keys that
//! could not be fetched) is answered 401. Output claim headers are cleared on every
//! request such a policy covers, so a client cannot forge them.

use std::time::{SystemTime, UNIX_EPOCH};

use ambit_core::jwt::{Authenticated, JwtError, JwtRule, apply, authenticate_cached};
use http::HeaderMap;

use crate::Shared;
use crate::serve::Target;

/// Authenticates a request, rewriting its headers as its rules say. `Ok(None)`: no
/// policy applies, or no token was sent.
pub(crate) fn check(
    shared: &Shared,
    target: &Target,
    headers: &mut HeaderMap,
    query: Option<&str>,
) -> Result<Option<Authenticated>, JwtError> {
    let state = shared.store.load();
    // Most waypoints authenticate nothing: no lookup, no strings.
    if !state.has_authentications() {
        return Ok(None);
    }
    let waypoint = format!("{}/{}", shared.config.namespace, shared.config.name);
    let service = target.service.as_ref().map(|s| s.key());
    let rules: Vec<&JwtRule> = service
        .as_deref()
        .into_iter()
        .chain(std::iter::once(waypoint.as_str()))
        .flat_map(|t| state.traffic_for(t))
        .filter_map(|p| p.authentication.as_deref())
        .flatten()
        .collect();
    if rules.is_empty() {
        return Ok(None);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let outcome = authenticate_cached(
        &rules,
        headers,
        query,
        now,
        &shared.tokens,
        state.traffic_epoch(),
    )?;
    apply(&rules, outcome.as_ref(), headers);
    Ok(outcome.map(|o| o.authenticated))
}
