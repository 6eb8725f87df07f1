//! Leader election over a `coordination.k8s.io/v1` Lease: of several control-plane
//! replicas, only the holder writes to the cluster (statuses, waypoint Deployments).
//!
//! The holder renews every `renew`; a lease not renewed for its duration is expired and
//! the next replica to look takes it (`leaseTransitions` + 1). Every write is a replace
//! with the resource version read, so two replicas never both win one round. A round
//! that hangs times out after one renewal period, and a holder that cannot renew steps
//! down while its lease has at least a renewal period left, so two leaders do not
//! overlap (expiry is timed, as client-go does, by how long this replica has seen the
//! record unchanged on its own monotonic clock, so the replicas' clocks need not agree;
//! a replica that starts waits one lease duration before taking an idle lease).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaderOptions {
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// Who this replica is (its pod name, say); unique among replicas.
    pub identity: String,
    pub lease: Duration,
    pub renew: Duration,
}

impl LeaderOptions {
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: "ambit-control".into(),
            identity: identity.into(),
            lease: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        }
    }
}

/// Runs the election for ever; the receiver says whether this replica leads now.
pub fn elect(
    client: kube::Client,
    options: LeaderOptions,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &options.namespace);
        let mut renewed: Option<Instant> = None;
        // The other holder's record as last seen, and when it was first seen so.
        let mut seen: Option<(String, Instant)> = None;
        loop {
            let attempt_started = Instant::now();
            // A round that hangs counts as failed before the next renewal is due.
            let result = tokio::time::timeout(options.renew, round(&api, &options, &mut seen))
                .await
                .unwrap_or_else(|_| {
                    Err(kube::Error::Service(
                        "the lease round timed out".to_owned().into(),
                    ))
                });
            let leading = match result {
                Ok(true) => {
                    renewed = Some(attempt_started);
                    true
                }
                Ok(false) => {
                    renewed = None;
                    false
                }
                Err(e) => {
                    // Keep leading only while our last renewal will still hold at the
                    // next look (one renewal period from now): a replica that cannot
                    // renew stops leading before its lease can pass to another.
                    let holds =
                        renewed.is_some_and(|t| t.elapsed() + options.renew * 2 < options.lease);
                    tracing::warn!(lease = %options.name, error = %e, leading = holds, "the leader lease could not be read or renewed");
                    holds
                }
            };
            if *tx.borrow() != leading {
                tracing::info!(
                    lease = %format!("{}/{}", options.namespace, options.name),
                    identity = %options.identity,
                    leading,
                    "leadership changed"
                );
                tx.send_replace(leading);
            }
            let wait = if leading {
                options.renew
            } else {
                options.renew.min(Duration::from_secs(2))
            };
            tokio::time::sleep(wait).await;
        }
    });
    (rx, task)
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// One look at the lease: take it if free or expired, renew it if ours. Ok(true) when
/// this replica holds it afterwards. `seen` remembers the other holder's record.
async fn round(
    api: &Api<Lease>,
    options: &LeaderOptions,
    seen: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let duration = i32::try_from(options.lease.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&options.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(options.name.clone()),
                namespace: Some(options.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(options.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let ours = spec.holder_identity.as_deref() == Some(options.identity.as_str());
    if !ours {
        // Expired when the record has not changed for its duration, timed by this
        // replica's monotonic clock from when it saw the record change: no agreement
        // between the replicas' clocks is needed.
        let record = format!(
            "{:?} {:?}",
            spec.holder_identity,
            spec.renew_time.as_ref().map(|MicroTime(t)| t.to_string())
        );
        if seen.as_ref().is_none_or(|(r, _)| *r != record) {
            *seen = Some((record, Instant::now()));
        }
        let held_for = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(duration)).unwrap_or(0),
        );
        let expired = seen.as_ref().is_some_and(|(_, at)| at.elapsed() > held_for);
        if !expired && spec.holder_identity.is_some() {
            return Ok(false);
        }
        spec.holder_identity = Some(options.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration);
    spec.renew_time = Some(now());
    // The resource version read makes this a compare-and-swap.
    match api
        .replace(&options.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
