//! Idle watchers: the same paced load without and with 1,000 watches open.

use std::time::Duration;

use super::Stack;
use crate::report;
use crate::stats::Latency;
use crate::workload::{self, Visibility};
use crate::{load, say, system, Args};

/// Paced commands without, then with, `WATCHERS` idle watches open on the query server.
pub async fn run(stack: &Stack, args: &Args, best: f64) -> anyhow::Result<report::Watchers> {
    let Stack {
        command,
        query,
        command_channel,
        query_channel,
        ..
    } = stack;
    let catalog = stack.catalog;
    const WATCHERS: usize = 1_000;
    // Customers nobody orders for: their watches stay idle.
    let mut c =
        shop_shared::pb::command_service_client::CommandServiceClient::new(command_channel.clone());
    for i in 0..WATCHERS {
        let id = format!("idle{i}");
        let _ = c
            .register_customer(shop_shared::pb::RegisterCustomerRequest {
                customer_id: id.clone(),
                name: format!("Idle {i}"),
                email: format!("{id}@bench.example"),
                ..Default::default()
            })
            .await;
    }
    let position = workload::log_position(command_channel.clone()).await?;
    workload::wait_applied(query_channel.clone(), position, Duration::from_secs(60)).await;
    let rate = if best > 0.0 { best / 2.0 } else { 1_000.0 };
    let mut runs = Vec::new();
    let mut open = Vec::new();
    for with in [false, true] {
        if with {
            let clients = workload::channels(&query.endpoint().into(), 10).await?;
            for i in 0..WATCHERS {
                let mut q = shop_shared::pb::query_service_client::QueryServiceClient::new(
                    clients[i % clients.len()].clone(),
                );
                let stream = q
                    .watch_customer(shop_shared::pb::WatchCustomerRequest {
                        customer_id: format!("idle{i}"),
                        min_position: position,
                    })
                    .await?
                    .into_inner();
                open.push(stream);
            }
        }
        let mut l = load(args.reference_clients, args);
        l.rate = Some(rate);
        let visibility = Visibility {
            query: shop_shared::pb::query_service_client::QueryServiceClient::new(
                query_channel.clone(),
            ),
            every: 10,
            latency: workload::shared_histogram(),
        };
        let before = workload::log_position(command_channel.clone()).await?;
        let meter = system::CpuMeter::start(&[("query-server", query.pid())]);
        let tag = format!("watch{}", u8::from(with));
        workload::run_commands(
            &command.endpoint().into(),
            &tag,
            catalog,
            &l,
            Some(visibility.clone()),
        )
        .await?;
        let after = workload::log_position(command_channel.clone()).await?;
        workload::wait_applied(query_channel.clone(), after, Duration::from_secs(60)).await;
        let cores = meter.stop().first().map_or(0.0, |(_, c)| *c);
        let seconds = l.duration.as_secs_f64();
        let events = (after - before) as f64;
        runs.push(report::WatcherRun {
            events_per_second: events / seconds,
            query_cpu_ms_per_1k_events: cores * seconds * 1000.0 / (events / 1000.0).max(1e-9),
            visibility: visibility
                .latency
                .lock()
                .map(|h| Latency::of(&h))
                .unwrap_or_default(),
        });
    }
    drop(open);
    let with = runs.pop().ok_or_else(|| anyhow::anyhow!("no run"))?;
    let without = runs.pop().ok_or_else(|| anyhow::anyhow!("no run"))?;
    say(format!(
        "watchers: {:.2} -> {:.2} query-server core-ms per 1k events, visible p99 {:.2} -> {:.2} ms with {WATCHERS} idle watches",
        without.query_cpu_ms_per_1k_events, with.query_cpu_ms_per_1k_events, without.visibility.p99_ms, with.visibility.p99_ms
    ));
    Ok(report::Watchers {
        watchers: WATCHERS,
        rate,
        without,
        with,
    })
}
