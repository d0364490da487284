//! Pipeline: the relay publishing a backlog and the query server applying one, next to
//! the raw ceilings (JetStream publish, ordered-consumer read).

use std::time::{Duration, Instant};

use super::Stack;
use crate::report::{Drain, Results};
use crate::workload;
use crate::{ceilings, load, say, Args};

/// NATS stopped while commands pile up in the log, then both backlogs drained.
pub async fn run(stack: &mut Stack, args: &Args, results: &mut Results) -> anyhow::Result<()> {
    let Stack {
        nats,
        command,
        query,
        command_channel,
        ..
    } = stack;
    let catalog = stack.catalog;
    query.terminate();
    nats.stop();
    let l = load(args.reference_clients, args);
    workload::run_commands(&command.endpoint().into(), "backlog", catalog, &l, None).await?;
    let log_end = workload::log_position(command_channel.clone()).await?;
    let published =
        shop_shared::pb::log_service_client::LogServiceClient::new(command_channel.clone())
            .get_log_status(shop_shared::pb::GetLogStatusRequest {})
            .await?
            .into_inner()
            .published_position;
    nats.restart();
    let log = shop_shared::pb::log_service_client::LogServiceClient::new(command_channel.clone());
    let relay = drain(published, log_end, || {
        let mut log = log.clone();
        async move {
            log.get_log_status(shop_shared::pb::GetLogStatusRequest {})
                .await
                .map(|s| s.into_inner().published_position)
                .ok()
        }
    })
    .await?;
    say(format!(
        "relay published a {}-event backlog at {:.0} events/s",
        relay.events, relay.per_second
    ));
    results.relay_drain = Some(relay);

    let applied_before = {
        query.spawn_until_listening();
        query.wait_serving().await;
        let q = workload::channels(&query.endpoint().into(), 1)
            .await?
            .remove(0);
        let s = shop_shared::pb::query_service_client::QueryServiceClient::new(q.clone())
            .get_status(shop_shared::pb::GetStatusRequest {})
            .await?
            .into_inner();
        (s.applied_position, q)
    };
    let q =
        shop_shared::pb::query_service_client::QueryServiceClient::new(applied_before.1.clone());
    let consumer = drain(applied_before.0, log_end, || {
        let mut q = q.clone();
        async move {
            q.get_status(shop_shared::pb::GetStatusRequest {})
                .await
                .map(|s| s.into_inner().applied_position)
                .ok()
        }
    })
    .await?;
    say(format!(
        "query server applied a {}-event backlog at {:.0} events/s",
        consumer.events, consumer.per_second
    ));
    results.consumer_drain = Some(consumer);
    Ok(())
}

/// The raw ceilings of the pipeline: JetStream publish, ordered-consumer read.
pub async fn ceilings(stack: &Stack, args: &Args, results: &mut Results) -> anyhow::Result<()> {
    let (nats, envelope_bytes) = (&stack.nats, stack.envelope_bytes);
    results.jetstream_publish = Some(
        ceilings::jetstream_publish(
            &nats.url(),
            envelope_bytes as usize,
            Duration::from_secs(args.seconds.max(2)),
            2048,
        )
        .await?,
    );
    results.ordered_read = Some(ceilings::ordered_consumer_read(&nats.url(), "SHOP_EVENTS").await?);
    say(format!(
        "ceilings: JetStream publish {:.0}/s, ordered read {:.0}/s",
        results
            .jetstream_publish
            .as_ref()
            .map_or(0.0, |c| c.per_second),
        results.ordered_read.as_ref().map_or(0.0, |c| c.per_second)
    ));
    Ok(())
}

/// How fast a position moves from `from` to `to`, timed from its first move (so that
/// reconnecting and start-up are not counted).
pub async fn drain<F, Fut>(from: u64, to: u64, mut position: F) -> anyhow::Result<Drain>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first, mut at_first) = (None, from);
    loop {
        let now = position().await.unwrap_or(from);
        if first.is_none() && now > from {
            first = Some(Instant::now());
            at_first = now;
        }
        if now >= to {
            let seconds = first.map_or(0.0, |t: Instant| t.elapsed().as_secs_f64());
            return Ok(Drain {
                events: to - from,
                seconds,
                per_second: (to - at_first) as f64 / seconds.max(1e-9),
            });
        }
        anyhow::ensure!(Instant::now() < deadline, "no progress from {from} to {to}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
