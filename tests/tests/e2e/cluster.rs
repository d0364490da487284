//! A 3-node NATS cluster with the stream at three replicas (`--nats-url` a list,
//! `--stream-replicas 3`, `--ack replicated`): nodes, the stream's leader among them, are
//! `kill -9`ed and restarted while clients send commands with unique ids. Then the
//! command server is `kill -9`ed the moment the load stops, as if its machine were lost:
//! every command it acknowledged must already be in the stream. Afterwards every
//! acknowledged command is in the log once, the stream mirrors the log (gapless,
//! sequence = position, same bytes), and the views equal a fold of the log.
//!
//! Rounds: `SHOP_CLUSTER_ROUNDS` (default 4: the leader twice, another node twice).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use shop_tests::cluster::NatsCluster;
use shop_tests::{
    assert_acknowledged_once, assert_stream_mirrors_log, eventually, log_position, pb,
    read_stream_with, read_whole_log, req, wait_applied, Server, ServerKind,
};

use crate::queries::random_command;
use shop_tests::model::{assert_views_equal, fetch_all, Views};

const STREAM: &str = "SHOP_EVENTS";
const CLIENTS: usize = 3;

fn rounds() -> usize {
    shop_tests::rounds("SHOP_CLUSTER_ROUNDS", 4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_loses_nothing_when_any_node_is_killed_under_load() {
    let mut cluster = NatsCluster::start().await;
    let urls = cluster.urls();
    let mut command = Server::start_on(
        ServerKind::Command,
        &urls,
        &["--stream-replicas", "3", "--ack", "replicated"],
    )
    .await;
    let query = Server::start_on(ServerKind::Query, &urls, &[]).await;
    let mut c = command.commands().await;
    for client in 0..CLIENTS {
        c.create_product(req::product(&format!("k{client}"), 100, 0))
            .await
            .expect("product");
    }
    assert_eq!(
        cluster.stream_replicas(STREAM).await,
        Some(3),
        "the relay created the stream with --stream-replicas"
    );

    // Clients: restocks with unique command ids (counted), and random commands.
    let stop = Arc::new(AtomicBool::new(false));
    // Acknowledged commands: id, result, when the answer came.
    type Acked = Vec<(String, pb::CommandResult, Instant)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let mut c = command.commands().await;
        let (stop, acked) = (stop.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client as u64 + 40);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let command_id = format!("restock-{client}-{n}");
                let restock = pb::RestockProductRequest {
                    command_id: command_id.clone(),
                    sku: format!("k{client}"),
                    quantity: 1,
                    ..Default::default()
                };
                if let Ok(reply) = c.restock_product(restock).await {
                    let result = reply.into_inner();
                    let at = Instant::now();
                    acked.lock().expect("acked").push((command_id, result, at));
                }
                random_command(&mut c, &mut rng).await;
            }
        }));
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let mut kills = Vec::new();
    for round in 0..rounds() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..800))).await;
        let leader = eventually(Duration::from_secs(20), "a stream leader", || {
            cluster.stream_leader(STREAM)
        })
        .await;
        let victim = if round % 2 == 0 {
            leader
        } else {
            (leader + rng.random_range(1..3)) % 3
        };
        let before = acked.lock().expect("acked").len();
        cluster.kill(victim);
        kills.push((round, victim, leader, Instant::now()));
        // Commands go on with two of three nodes, after at most a leader election.
        eventually(
            Duration::from_secs(30),
            "commands acknowledged on two nodes",
            || {
                let n = acked.lock().expect("acked").len();
                std::future::ready((n > before + 10).then_some(()))
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
        cluster.restart(victim);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    // The command server's machine is lost the moment the load stops: what it
    // acknowledged is in the stream already (`--ack replicated`), relay lag or not.
    command.kill9();
    let client = cluster.client().await;
    let acked = acked.lock().expect("acked").clone();
    assert!(
        acked.len() > 20,
        "only {} commands acknowledged",
        acked.len()
    );
    for (round, victim, leader, at) in &kills {
        // The longest pause in acknowledgements in the 15 s after the kill.
        let mut times: Vec<Instant> = acked
            .iter()
            .map(|a| a.2)
            .filter(|t| *t >= *at && *t <= *at + Duration::from_secs(15))
            .collect();
        times.insert(0, *at);
        let pause = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        eprintln!(
            "round {round}: killed {} (stream leader {}); longest pause in acknowledgements {pause:?}",
            cluster.name(*victim),
            cluster.name(*leader)
        );
    }
    let in_stream: HashMap<u64, String> = read_stream_with(&client, STREAM)
        .await
        .into_iter()
        .map(|m| (m.sequence, m.envelope.command_id))
        .collect();
    for (id, result, _) in &acked {
        assert_eq!(
            in_stream.get(&result.position),
            Some(id),
            "acknowledged {id} (position {}) is not in the stream",
            result.position
        );
    }
    command.restart().await;

    // The stream catches up with the log, and mirrors it.
    let position = log_position(&mut command.log_reader().await).await;
    eventually(
        Duration::from_secs(60),
        "the stream to reach the log's end",
        || async {
            let js = async_nats::jetstream::new(client.clone());
            let last = js
                .get_stream(STREAM)
                .await
                .ok()?
                .info()
                .await
                .ok()?
                .state
                .last_sequence;
            (last >= position).then_some(())
        },
    )
    .await;
    let log = read_whole_log(&mut command.log_reader().await).await;
    assert_eq!(log.len() as u64, position);
    let stream = read_stream_with(&client, STREAM).await;
    assert_stream_mirrors_log(&stream, &log);

    // Every acknowledged command is in the log, once, at its position.
    assert_acknowledged_once(&log, acked.iter().map(|a| (a.0.as_str(), a.1.position)));

    // The views equal a fold of the log.
    let mut q = query.queries().await;
    wait_applied(&q, position, Duration::from_secs(60)).await;
    assert_views_equal(
        &fetch_all(&mut q, position).await,
        &Views::fold(&log),
        "after the node kills",
    );
    drop(cluster);
}
