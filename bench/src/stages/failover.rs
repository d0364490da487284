//! Failover: a writer and a hot standby (`--ack replicated`) on one NATS node, a client
//! restocking through whichever writes (`shop_tests::writers::AnyWriter`); the writer is
//! `kill -9`ed `--failover-trials` times (restarted as the standby after each) and the
//! time from the kill to the first command acknowledged by the new writer is measured,
//! at `--failover-ttl-ms` (the servers' default lease TTL unless given). Then the
//! catch-up rate: a standby started with an empty data dir on the stream the commands
//! left, until its log holds all of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use shop_tests::writers::{writer_of, AnyWriter};
use shop_tests::{eventually, log_position, pb, req, Nats, Server, ServerKind};

use crate::workload::{self, Catalog};
use crate::{load, say, Args};

#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub lease_ttl_ms: u64,
    /// Kill → first acknowledgement by the new writer, per trial, in ms.
    pub trials_ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    /// Events a standby started empty read back from the stream.
    pub catch_up_events: u64,
    pub catch_up_seconds: f64,
    pub catch_up_per_second: f64,
}

pub async fn run(args: &Args, catalog: Catalog) -> anyhow::Result<Failover> {
    let nats = Nats::start();
    let ttl = args.failover_ttl_ms.to_string();
    // Replicated: every acknowledged command is in the stream, so the old writer always
    // comes back as a standby (with `--ack local` a command answered but not yet relayed
    // when the writer died makes it refuse to start: the failover window, README).
    let flags = ["--lease-ttl-ms", ttl.as_str(), "--ack", "replicated"];
    let a = Server::start(ServerKind::Command, &nats, &flags).await;
    let b = Server::start_standby(&nats.url(), &flags).await;
    a.commands()
        .await
        .create_product(req::product("failover", 100, 0))
        .await?;
    let mut servers = [a, b];

    // The client: acknowledgements with the server that gave them.
    let acks: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (acks, stop) = (acks.clone(), stop.clone());
        let mut writer = AnyWriter::new(servers.iter().map(Server::endpoint).collect());
        tokio::spawn(async move {
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let request = pb::RestockProductRequest {
                    command_id: format!("failover-{n}"),
                    sku: "failover".into(),
                    quantity: 1,
                    ..Default::default()
                };
                let give_up = |_| stop.load(Ordering::Relaxed);
                match writer.restock(&request, give_up).await {
                    Some(answered) => acks
                        .lock()
                        .expect("acks")
                        .push((Instant::now(), answered.server)),
                    None => break,
                }
            }
        })
    };

    let mut trials_ms = Vec::new();
    for trial in 0..args.failover_trials {
        let writer = writer_of(&servers).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed_at = Instant::now();
        servers[writer].kill9();
        let took = eventually(
            Duration::from_secs(60),
            "the new writer's first ack",
            || {
                let first = acks
                    .lock()
                    .expect("acks")
                    .iter()
                    .find(|(at, server)| *at > killed_at && *server != writer)
                    .map(|(at, _)| *at - killed_at);
                std::future::ready(first)
            },
        )
        .await;
        let ms = took.as_secs_f64() * 1000.0;
        say(format!("failover trial {trial}: {ms:.0} ms"));
        trials_ms.push(ms);
        servers[writer].spawn_until_listening();
        servers[writer].wait_log_serving().await;
    }
    stop.store(true, Ordering::Relaxed);
    client.await?;

    // History for the catch-up: the command workload on the writer.
    let writer = writer_of(&servers).await;
    let endpoint = servers[writer].endpoint();
    workload::setup(&endpoint.clone().into(), catalog).await?;
    let l = load(args.reference_clients, args);
    workload::run_commands(&endpoint.into(), "failover-history", catalog, &l, None).await?;
    let events = log_position(&mut servers[writer].log_reader().await).await;
    let started = Instant::now();
    let empty = Server::start_standby(&nats.url(), &flags).await;
    eventually(
        Duration::from_secs(600),
        "the empty standby to catch up",
        || async { (log_position(&mut empty.log_reader().await).await >= events).then_some(()) },
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    say(format!(
        "catch-up: {events} events in {seconds:.1} s ({:.0}/s)",
        events as f64 / seconds
    ));

    let mut sorted = trials_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Failover {
        lease_ttl_ms: args.failover_ttl_ms,
        p50_ms: sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
        max_ms: sorted.last().copied().unwrap_or_default(),
        trials_ms,
        catch_up_events: events,
        catch_up_seconds: seconds,
        catch_up_per_second: events as f64 / seconds,
    })
}
