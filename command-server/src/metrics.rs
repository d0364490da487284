//! The command server's own Prometheus metrics (README: Observability). Positions and the relay
//! lag are read at scrape time through [`positions`], the function `GetLogStatus` reads
//! them with, so the two never disagree; the group-commit histograms are fed by the
//! flusher ([`crate::writer::SyncStats`]); commands are counted by outcome in the gRPC
//! adapter.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use shop_shared::metrics::{gauge_value, methods_of, register_gauge_fn, Registry};

use crate::relay::RelayStatus;
use crate::writer::WriterWatch;

/// The log's durable end and how far the relay has published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    /// Last durable log position.
    pub log: u64,
    /// Last position the stream acknowledged (never beyond `log`).
    pub published: u64,
}

impl Positions {
    /// Events durable in the log and not yet acknowledged by the stream.
    pub fn relay_lag(self) -> u64 {
        self.log - self.published
    }
}

/// Reads the positions as `GetLogStatus` reports them.
pub fn positions(writer: &WriterWatch, relay: &RelayStatus) -> Positions {
    let log = *writer.durable_position.borrow();
    Positions {
        log,
        published: relay.published().min(log),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
    outcome: &'static str,
}

/// What the gRPC adapter records per command.
#[derive(Clone)]
pub struct CommandMetrics {
    commands: Family<CommandLabels, Counter>,
    /// `shop_shed_requests_total`, shared with the per-connection limit: a full writer
    /// queue is shedding too.
    shed: Counter,
}

impl CommandMetrics {
    /// Counts one command: `outcome` is `OK`, `Replayed` (an idempotent retry answered
    /// from its record), or the refusal's code as `grpc_code` spells it
    /// (`InvalidArgument`, `FailedPrecondition`, ...).
    pub fn command(&self, command: &'static str, outcome: &'static str) {
        self.commands
            .get_or_create(&CommandLabels { command, outcome })
            .inc();
    }

    /// Counts one request refused because the server was at a limit.
    pub fn shed(&self) {
        self.shed.inc();
    }
}

/// Registers the command server's metrics; `shed` is the counter the per-connection
/// limit registered.
pub fn register(
    registry: &mut Registry,
    writer: &WriterWatch,
    relay: &Arc<RelayStatus>,
    shed: Counter,
) -> CommandMetrics {
    let metrics = CommandMetrics {
        commands: Family::default(),
        shed,
    };
    // A zero series per command, so that rates and dashboards start before the first.
    for command in methods_of(crate::SERVICE_NAME) {
        drop(metrics.commands.get_or_create(&CommandLabels {
            command,
            outcome: "OK",
        }));
    }
    registry.register(
        "shop_commands",
        "Commands answered, by command and outcome (OK, Replayed, or the refusal's gRPC code)",
        metrics.commands.clone(),
    );
    let (w, r) = (writer.clone(), relay.clone());
    register_gauge_fn(
        registry,
        "shop_log_position",
        "Last durable position of the event log.",
        move || gauge_value(positions(&w, &r).log),
    );
    let (w, r) = (writer.clone(), relay.clone());
    register_gauge_fn(
        registry,
        "shop_relay_published_position",
        "Last log position the JetStream stream acknowledged.",
        move || gauge_value(positions(&w, &r).published),
    );
    let (w, r) = (writer.clone(), relay.clone());
    register_gauge_fn(
        registry,
        "shop_relay_lag_events",
        "Durable events not yet acknowledged by the stream (log position minus published position).",
        move || gauge_value(positions(&w, &r).relay_lag()),
    );
    registry.register(
        "shop_group_commit_sync_seconds",
        "Duration of each group-commit sync (sled flush, and fdatasync in fsync mode)",
        writer.syncs.sync_seconds.clone(),
    );
    registry.register(
        "shop_group_commit_commands",
        "Commands acknowledged by each group-commit sync",
        writer.syncs.commands_per_sync.clone(),
    );
    metrics
}
