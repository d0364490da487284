//! Mixed: reads while commands saturate the machine. GetOrder and ListOrders, paced at a
//! fixed rate by a few clients, first on an idle stack, then during a run of the command
//! workload at the reference concurrency; their p50/p99 side by side, and what the
//! commands achieved meanwhile.

use std::sync::Arc;

use serde::Serialize;

use super::Stack;
use crate::report::Results;
use crate::stats::RunSummary;
use crate::workload::{self, QueryKind};
use crate::{load, say, system, Args};

/// Readers, and the total rate they are paced at (reads/s): enough for stable
/// percentiles, little enough that reading does not take the machine from the writes.
const READERS: usize = 8;
const READ_RATE: f64 = 400.0;

/// One query kind, idle and under writes.
#[derive(Debug, Clone, Serialize)]
pub struct MixedQuery {
    pub idle: RunSummary,
    pub loaded: RunSummary,
    /// The commands that ran meanwhile.
    pub commands: RunSummary,
    /// CPU (cores) of each process during the loaded run.
    pub cpu: Vec<(String, f64)>,
}

impl MixedQuery {
    /// p99 under writes / p99 idle.
    pub fn p99_ratio(&self) -> f64 {
        self.loaded.latency.p99_ms / self.idle.latency.p99_ms.max(1e-9)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Mixed {
    /// The writes' pace (commands/s), `None`: as fast as answered.
    pub write_rate: Option<f64>,
    pub readers: usize,
    pub read_rate: f64,
    pub writers: usize,
    pub get_order: MixedQuery,
    pub list_orders: MixedQuery,
}

pub async fn run(
    stack: &Stack,
    args: &Args,
    orders: Vec<String>,
    results: &mut Results,
) -> anyhow::Result<()> {
    let mut writers = load(args.reference_clients, args);
    let orders = if orders.is_empty() {
        // Orders to read: a short run of the workload places some.
        let mut short = writers.clone();
        short.duration = short.duration.min(std::time::Duration::from_secs(2));
        workload::run_commands(
            &stack.command.endpoint().into(),
            "mixed-setup",
            stack.catalog,
            &short,
            None,
        )
        .await?
        .orders
    } else {
        orders
    };
    let orders = Arc::new(orders);
    writers.rate = args.mixed_write_rate;
    let mut readers = load(READERS, args);
    readers.rate = Some(READ_RATE);
    let query: workload::Target = stack.query.endpoint().into();
    let command: workload::Target = stack.command.endpoint().into();
    let mut points = Vec::new();
    for (i, kind) in [QueryKind::GetOrder, QueryKind::ListOrders]
        .into_iter()
        .enumerate()
    {
        let idle =
            workload::run_queries(&query, kind, orders.clone(), stack.catalog, &readers).await?;
        let meter = system::CpuMeter::start(&[
            ("command-server", stack.command.pid()),
            ("query-server", stack.query.pid()),
            ("nats-server", stack.nats.pid()),
            ("bench", Some(std::process::id())),
        ]);
        let prefix = format!("m{i}");
        let (commands, loaded) = tokio::join!(
            workload::run_commands(&command, &prefix, stack.catalog, &writers, None),
            workload::run_queries(&query, kind, orders.clone(), stack.catalog, &readers),
        );
        let cpu = meter.stop();
        let point = MixedQuery {
            idle,
            loaded: loaded?,
            commands: commands?.summary,
            cpu,
        };
        say(format!(
            "mixed {}: idle p50 {:.2} ms p99 {:.2} ms; during {:.0} commands/s p50 {:.2} ms p99 {:.2} ms ({:.1}x)",
            point.idle.name,
            point.idle.latency.p50_ms,
            point.idle.latency.p99_ms,
            point.commands.per_second,
            point.loaded.latency.p50_ms,
            point.loaded.latency.p99_ms,
            point.p99_ratio()
        ));
        points.push(point);
    }
    let list_orders = points.pop().expect("two points");
    let get_order = points.pop().expect("two points");
    results.mixed = Some(Mixed {
        write_rate: args.mixed_write_rate,
        readers: READERS,
        read_rate: READ_RATE,
        writers: args.reference_clients,
        get_order,
        list_orders,
    });
    Ok(())
}
