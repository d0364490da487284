//! Half load: the command workload paced at half the best throughput (p99, ack →
//! visible, query lag).

use super::Stack;
use crate::report::{HalfLoad, Results};
use crate::stats::Latency;
use crate::workload::{self, LagMonitor, Visibility};
use crate::{load, say, Args};

pub async fn run(stack: &Stack, args: &Args, results: &mut Results) -> anyhow::Result<()> {
    let Stack {
        command,
        command_channel,
        query_channel,
        ..
    } = stack;
    let catalog = stack.catalog;
    // Half load: paced at half the best throughput.
    let best = results
        .commands
        .iter()
        .map(|p| p.commands.per_second)
        .fold(0.0, f64::max);
    if best > 0.0 {
        let mut l = load(args.reference_clients, args);
        l.rate = Some(best / 2.0);
        let monitor = LagMonitor::start(command_channel.clone(), query_channel.clone());
        let visibility = Visibility::new(query_channel.clone(), 10);
        let run = workload::run_commands(
            &command.endpoint().into(),
            "half",
            catalog,
            &l,
            Some(visibility.clone()),
        )
        .await?;
        let lag = monitor.finish().await?;
        let vis = visibility
            .latency
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default();
        say(format!(
            "half load {:.0}/s: achieved {:.0}/s, p99 {:.2} ms, visible p99 {:.2} ms",
            best / 2.0,
            run.summary.per_second,
            run.summary.latency.p99_ms,
            vis.p99_ms
        ));
        results.half_load = Some(HalfLoad {
            target_rate: best / 2.0,
            syncs: workload::syncs(command_channel.clone()).await,
            commands: run.summary,
            visibility: vis,
            max_query_lag: lag.iter().map(|s| s.query_lag()).max().unwrap_or(0),
        });
    }

    Ok(())
}
