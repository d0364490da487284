//! The query server's own Prometheus metrics (README: Observability), read at scrape time from
//! the state `GetStatus` reads ([`ConsumerStatus::freshness`], the watcher registry), so a
//! scrape and `GetStatus` never disagree.

use std::sync::Arc;

use shop_shared::metrics::{gauge_value, register_gauge_fn, Registry};

use crate::consumer::ConsumerStatus;
use crate::watchers::Watchers;

/// Registers the positions, the lag and the watcher count.
pub fn register(registry: &mut Registry, status: &Arc<ConsumerStatus>, watchers: &Arc<Watchers>) {
    let s = status.clone();
    register_gauge_fn(
        registry,
        "shop_query_applied_position",
        "Last stream position applied to the views.",
        move || gauge_value(s.freshness().applied),
    );
    let s = status.clone();
    register_gauge_fn(
        registry,
        "shop_query_lag_events",
        "Events in the stream not yet applied (stream end as last seen minus applied position).",
        move || gauge_value(s.freshness().lag),
    );
    let w = watchers.clone();
    register_gauge_fn(
        registry,
        "shop_query_watchers",
        "Open WatchOrder/WatchCustomer streams.",
        move || gauge_value(w.active() as u64),
    );
}
