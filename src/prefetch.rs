//! Credentials before the first request: when a container with a role starts, its credentials
//! are fetched and then kept refreshed for as long as it runs, so that its SDK's first request is
//! a cache hit instead of a cold STS call racing the SDK's one-second timeout.
//!
//! Follows the container index's events; holds one broker [`Lease`] per running container with a
//! role and drops it when the container stops (the broker then evicts idle entries on its own).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::credentials::broker::{Broker, Lease};
use crate::identity::{Identity, RoleState};
use crate::index::{Container, Index, IndexEvent};

/// Keeps the leases of running containers until `shutdown`.
pub async fn run(
    index: Index,
    identity: Arc<Identity>,
    broker: Broker,
    shutdown: CancellationToken,
) {
    let mut events = index.subscribe();
    let mut leases: HashMap<String, Lease> = HashMap::new();
    // Containers indexed before we subscribed.
    reset(&index, &identity, &broker, &mut leases);
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(IndexEvent::Added(c)) => {
                if let Some(lease) = lease_for(&identity, &broker, &c) {
                    leases.insert(c.id.clone(), lease);
                }
            }
            Ok(IndexEvent::Removed(c)) => {
                leases.remove(&c.id);
                identity.forget(&c);
            }
            // Too many changes at once to follow one by one: start over from the index.
            Ok(IndexEvent::Reset) | Err(RecvError::Lagged(_)) => {
                reset(&index, &identity, &broker, &mut leases);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn reset(index: &Index, identity: &Identity, broker: &Broker, leases: &mut HashMap<String, Lease>) {
    let mut fresh = HashMap::new();
    for c in index.containers() {
        if let Some(lease) = lease_for(identity, broker, &c) {
            fresh.insert(c.id.clone(), lease);
        }
    }
    // New leases are taken before the old ones are dropped, so unchanged containers keep their
    // cache entries throughout.
    *leases = fresh;
}

fn lease_for(identity: &Identity, broker: &Broker, c: &Arc<Container>) -> Option<Lease> {
    let workload = identity.container_workload(c)?;
    match &workload.role {
        RoleState::Assigned(a) => {
            tracing::debug!(container = %c.name, role = %a.request().role_arn, origin = %a.origin, "prefetching credentials");
            Some(broker.retain(a.request()))
        }
        RoleState::Refused(r) => {
            tracing::warn!(container = %c.name, container_id = %c.short_id(), code = r.code, reason = %r.message, "container asks for a role it may not have");
            None
        }
        RoleState::None | RoleState::Pending | RoleState::Unserved(_) => None,
    }
}
