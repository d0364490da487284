//! Growth: command rate, memory and start-up time as the log grows, on a fresh stack.

use std::time::{Duration, Instant};

use shop_tests::{Nats, Server, ServerKind};

use crate::report::GrowthPoint;
use crate::workload::{self, Catalog};
use crate::{load, say, system, Args};

pub async fn run(args: &Args, catalog: Catalog) -> anyhow::Result<Vec<GrowthPoint>> {
    let nats = Nats::start();
    let mut command = Server::start(ServerKind::Command, &nats, &[]).await;
    let mut query = Server::start(ServerKind::Query, &nats, &[]).await;
    workload::setup(&command.endpoint().into(), catalog).await?;
    let channel = workload::channels(&command.endpoint().into(), 1)
        .await?
        .remove(0);
    let mut sizes = vec![0u64];
    sizes.extend(args.growth.iter().copied());
    let mut points: Vec<GrowthPoint> = Vec::new();
    let l = load(args.reference_clients, args);
    for (i, size) in sizes.into_iter().enumerate() {
        let mut chunk = 0;
        while workload::log_position(channel.clone()).await? < size {
            let mut fill = l.clone();
            fill.duration = Duration::from_secs(5);
            workload::run_commands(
                &command.endpoint().into(),
                &format!("fill{i}-{chunk}"),
                catalog,
                &fill,
                None,
            )
            .await?;
            chunk += 1;
            say(format!(
                "growth: filling the log: {} / {size} events",
                workload::log_position(channel.clone()).await?
            ));
        }
        let in_log = workload::log_position(channel.clone()).await?;
        let q = workload::channels(&query.endpoint().into(), 1)
            .await?
            .remove(0);
        workload::wait_applied(q, in_log, Duration::from_secs(600)).await;
        let run = workload::run_commands(
            &command.endpoint().into(),
            &format!("growth{i}"),
            catalog,
            &l,
            None,
        )
        .await?;
        let command_rss = command.pid().map_or(0.0, system::rss_mb);
        let query_rss = query.pid().map_or(0.0, system::rss_mb);
        // The first start scans what sled wrote since its last open (sled 0.34 writes its
        // page-table snapshot only when it opens a store); the second shows the cost after.
        let command_start = restart_time(&mut command).await;
        let command_restart = restart_time(&mut command).await;
        let query_start = restart_time(&mut query).await;
        let query_restart = restart_time(&mut query).await;
        let empty = points
            .first()
            .map_or(run.summary.per_second, |p| p.commands_per_second);
        say(format!(
            "growth: {in_log} events: {:.0} commands/s, RSS {command_rss:.0}/{query_rss:.0} MB, start {command_start:.2}/{query_start:.2} s (again {command_restart:.2}/{query_restart:.2} s)",
            run.summary.per_second
        ));
        points.push(GrowthPoint {
            events_in_log: in_log,
            commands_per_second: run.summary.per_second,
            ratio_to_empty: run.summary.per_second / empty.max(1e-9),
            command_server_rss_mb: command_rss,
            query_server_rss_mb: query_rss,
            command_server_start_s: command_start,
            query_server_start_s: query_start,
            command_server_restart_s: command_restart,
            query_server_restart_s: query_restart,
            command_data_mb: system::dir_mb(&command.data_dir),
            query_data_mb: system::dir_mb(&query.data_dir),
        });
    }
    Ok(points)
}

/// Graceful stop, then the time from spawn to health SERVING.
async fn restart_time(server: &mut Server) -> f64 {
    server.terminate();
    let t = Instant::now();
    server.spawn_until_listening();
    server.wait_serving().await;
    t.elapsed().as_secs_f64()
}
