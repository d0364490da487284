//! Commands: the mixed durable workload at each concurrency, next to the echo ceiling
//! (a no-op tonic server, same request shapes and concurrency) and a raw sled
//! group-commit ceiling; ack → visible latency of sampled commands; query lag.

use std::time::Duration;

use super::Stack;
use crate::report::{CommandPoint, Results};
use crate::stats::Latency;
use crate::workload::{self, LagMonitor, Visibility};
use crate::{ceilings, load, perf_finish, perf_start, say, system, Args};

/// Runs the sweep; returns the ids of the orders placed (for the query stage).
pub async fn run(
    stack: &Stack,
    args: &Args,
    sweep: &[usize],
    echo: &str,
    results: &mut Results,
) -> anyhow::Result<Vec<String>> {
    let Stack {
        nats,
        command,
        query,
        command_channel,
        query_channel,
        ..
    } = stack;
    let (catalog, envelope_bytes) = (stack.catalog, stack.envelope_bytes);
    let mut orders: Vec<String> = Vec::new();
    for (run_index, &clients) in sweep.iter().enumerate() {
        let l = load(clients, args);
        let echo_run = workload::run_echo(&echo.to_string().into(), false, &l).await?;
        let before = workload::log_position(command_channel.clone()).await?;
        let monitor = LagMonitor::start(command_channel.clone(), query_channel.clone());
        let visibility = Visibility::new(query_channel.clone(), 20);
        let profile = (args.perf && clients == args.reference_clients).then(|| perf_start(args));
        let meter = system::CpuMeter::start(&[
            ("command-server", command.pid()),
            ("query-server", query.pid()),
            ("nats-server", nats.pid()),
            ("bench", Some(std::process::id())),
        ]);
        let run = workload::run_commands(
            &command.endpoint().into(),
            &format!("c{run_index}"),
            catalog,
            &l,
            Some(visibility.clone()),
        )
        .await?;
        let cpu = meter.stop();
        if let Some(Some(p)) = profile {
            perf_finish(p, &args.out);
        }
        let lag = monitor.finish().await?;
        let after = workload::log_position(command_channel.clone()).await?;
        let drain = workload::wait_applied(query_channel.clone(), after, Duration::from_secs(60))
            .await
            .unwrap_or(Duration::from_secs(60));
        let events_per_command = (after - before) as f64 / run.summary.ok.max(1) as f64;
        let sled_dir = tempfile::tempdir()?;
        let record = (envelope_bytes * events_per_command) as usize;
        let sled = tokio::task::spawn_blocking({
            let dir = sled_dir.path().to_path_buf();
            let d = l.duration;
            move || ceilings::sled_group_commit(&dir, record, clients, d)
        })
        .await??;
        let vis = visibility
            .latency
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default();
        say(format!(
            "commands x{clients}: {:.0}/s (echo {:.0}/s, sled ceiling {:.0}/s), p99 {:.2} ms, visible p99 {:.2} ms, drained in {:.2}s",
            run.summary.per_second, echo_run.per_second, sled.per_second, run.summary.latency.p99_ms, vis.p99_ms, drain.as_secs_f64()
        ));
        orders.extend(run.orders.iter().cloned());
        results.commands.push(CommandPoint {
            ratio_to_echo: run.summary.per_second / echo_run.per_second.max(1e-9),
            max_query_lag: lag.iter().map(|s| s.query_lag()).max().unwrap_or(0),
            max_relay_lag: lag
                .iter()
                .map(|s| s.log_position.saturating_sub(s.published))
                .max()
                .unwrap_or(0),
            commands: run.summary,
            kinds: run.kinds,
            events_per_command,
            echo: echo_run,
            sled_ceiling: sled,
            visibility: vis,
            drain_s: drain.as_secs_f64(),
            cpu,
            syncs: workload::syncs(command_channel.clone()).await,
            lag,
        });
    }

    Ok(orders)
}
