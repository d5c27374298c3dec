//! Consul discovery: one task follows the node's catalog (`GET /v1/catalog/node/{node}` as a
//! blocking query) and keeps the lifecycle's Consul apps equal to it through
//! [`LifecycleHandle::sync_consul`]. [`catalog`] turns each answer into [`AppSpec`]s.
//!
//! Contract: only a *good* catalog read changes anything (a failed, malformed or `null` answer
//! keeps the last apps); a service with bad tags keeps its last good app. The task never
//! touches app state itself. While the lifecycle refuses a service (its VIP or name held by
//! another app), the catalog is read again without blocking every few seconds, so a freed VIP
//! is taken quickly. A catalog that changes all the time is read at most every [`MIN_GAP`].
//!
//! [`AppSpec`]: crate::app::AppSpec

use std::time::Duration;

use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    catalog,
    client::{
        Client, ConsulError, Endpoint, MAX_BACKOFF, MIN_BACKOFF, REQUEST_TIMEOUT, WarnLimiter,
        next_index,
    },
};
use crate::{
    backoff::Backoff,
    messages::{LifecycleError, LifecycleHandle},
    metrics::Metrics,
};

/// Consul caps a blocking query's `wait` at 10 minutes.
pub const MAX_WAIT: Duration = Duration::from_mins(10);
/// Time between two catalog reads at least: a catalog that changes all the time must not make
/// the agent hammer Consul, and changes still arrive well within a second.
pub const MIN_GAP: Duration = Duration::from_millis(200);
/// While the lifecycle refuses a Consul service (a VIP or name held by another app), the
/// catalog is read again without blocking after this delay, doubling up to
/// [`MAX_REFUSED_RETRY`]: a VIP freed elsewhere (an HTTP app unregistered) is picked up in
/// seconds rather than at the next blocking answer, up to `consul_query_interval` away.
pub const MIN_REFUSED_RETRY: Duration = Duration::from_secs(1);
/// The longest delay between two reads while the lifecycle refuses a service.
pub const MAX_REFUSED_RETRY: Duration = Duration::from_secs(15);

/// The query and timeout of one catalog read. With an index it is a blocking query, which
/// Consul may hold up to `wait + wait/16`; without one (the first read, after an index reset,
/// a Consul without `X-Consul-Index`, a retry of refused services) Consul answers at once, so
/// the short [`REQUEST_TIMEOUT`] applies.
fn catalog_query(
    index: Option<u64>,
    wait: Duration,
    stale: bool,
) -> (Vec<(&'static str, Option<String>)>, Duration) {
    let mut query = Vec::new();
    let mut timeout = REQUEST_TIMEOUT;
    if let Some(i) = index.filter(|i| *i > 0) {
        query.push(("index", Some(i.to_string())));
        query.push(("wait", Some(format!("{}ms", wait.as_millis()))));
        timeout = wait + wait / 16 + REQUEST_TIMEOUT;
    }
    if stale {
        query.push(("stale", None));
    }
    (query, timeout)
}

/// The discovery task: follows the node's catalog with blocking queries and keeps the
/// lifecycle's Consul apps equal to it. Runs until `cancel`.
pub async fn discover(
    client: Client,
    lifecycle: LifecycleHandle,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let s = client.settings().clone();
    let wait = s.query_interval.min(MAX_WAIT);
    let mut index: Option<u64> = None;
    let mut backoff = Backoff::new(
        MIN_BACKOFF,
        MAX_BACKOFF.min(s.query_interval.max(MIN_BACKOFF)),
    );
    // Set while the lifecycle refuses some service: the next read does not block.
    let mut retry_refused = false;
    let mut refused_backoff = Backoff::new(MIN_REFUSED_RETRY, MAX_REFUSED_RETRY);
    let mut warn_limit = WarnLimiter::new("consul discovery");
    let mut last_refusals: Vec<String> = Vec::new();
    info!(addr = %s.base, node = %s.node, stale = s.stale, "consul discovery started");
    loop {
        let started = Instant::now();
        let blocking_index = if retry_refused { None } else { index };
        let (query, timeout) = catalog_query(blocking_index, wait, s.stale);
        let url = client.url(&["catalog", "node", &s.node], &query);
        let read = tokio::select! {
            () = cancel.cancelled() => return,
            r = read_catalog(&client, url, &s.node, timeout) => r,
        };
        let (answered_index, discovered) = match read {
            Ok(r) => r,
            Err(e) => {
                let delay = backoff.next_delay();
                warn_limit.failed(&e, delay);
                if cancel.run_until_cancelled(sleep(delay)).await.is_none() {
                    return;
                }
                continue;
            }
        };
        warn_limit.succeeded();
        backoff.reset();
        let prev = index.unwrap_or(0);
        index = next_index(prev, answered_index);
        if index == Some(0) && prev > 0 {
            info!(
                previous = prev,
                "consul index went backwards: reading the catalog afresh"
            );
        }

        let keep = discovered.keep();
        let mut refusals: Vec<String> =
            discovered.refused.iter().map(ToString::to_string).collect();
        let wanted = discovered.apps.len();
        let mut accepted = 0;
        match lifecycle.sync_consul(discovered.apps, keep).await {
            Ok(refused) => {
                accepted = wanted - refused.len();
                retry_refused = !refused.is_empty();
                refusals.extend(
                    refused
                        .iter()
                        .map(|(name, e)| format!("service {name:?}: {e}")),
                );
            }
            Err(LifecycleError::ShuttingDown) => return,
            Err(e) => {
                retry_refused = true;
                refusals.push(e.to_string());
            }
        }
        metrics.consul_discovered(accepted, refusals.len());
        refusals.sort();
        // Each refusal is logged when it appears, not on every read of an unchanged catalog.
        for r in refusals.iter().filter(|r| !last_refusals.contains(r)) {
            warn!("consul service refused, the others go on: {r}");
        }
        last_refusals = refusals;

        let pause = if retry_refused {
            // What the lifecycle refused may fit soon (a VIP freed by another app), and a
            // blocking read would only answer at the next catalog change.
            let delay = refused_backoff.next_delay();
            debug!(
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "consul services refused: reading the catalog again without blocking"
            );
            delay.min(s.query_interval.max(MIN_GAP))
        } else if index.is_none() {
            refused_backoff.reset();
            // No X-Consul-Index: this Consul cannot block, so poll at the query interval.
            s.query_interval
        } else {
            refused_backoff.reset();
            MIN_GAP.saturating_sub(started.elapsed())
        };
        if cancel.run_until_cancelled(sleep(pause)).await.is_none() {
            return;
        }
    }
}

/// One catalog read: the answer's index and what it says, or why it cannot be used.
async fn read_catalog(
    client: &Client,
    url: reqwest::Url,
    node: &str,
    timeout: Duration,
) -> Result<(Option<u64>, catalog::Discovered), ConsulError> {
    let shown = url.to_string();
    let (parsed, index) = client
        .get(Endpoint::CatalogNode, url, timeout, catalog::parse_node)
        .await?;
    // `null`: the node is unknown. Reading that as "no services" would remove every Consul app
    // because of a Consul hiccup (a node re-registering), so it is an error: nothing changes.
    let Some(node_data) = parsed else {
        return Err(ConsulError::UnknownNode {
            url: shown,
            node: node.to_owned(),
        });
    };
    Ok((
        index,
        catalog::discover(&node_data, client.settings().policy),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: reads without an index got the blocking-query timeout (minutes).
    #[test]
    fn only_blocking_reads_get_the_long_timeout() {
        let wait = Duration::from_secs(160);
        for index in [None, Some(0)] {
            let (query, timeout) = catalog_query(index, wait, true);
            assert_eq!(timeout, REQUEST_TIMEOUT, "{index:?}");
            assert_eq!(query, [("stale", None)]);
        }
        let (query, timeout) = catalog_query(Some(7), wait, false);
        assert_eq!(timeout, wait + Duration::from_secs(10) + REQUEST_TIMEOUT);
        assert_eq!(
            query,
            [
                ("index", Some("7".to_owned())),
                ("wait", Some("160000ms".to_owned()))
            ]
        );
    }
}
