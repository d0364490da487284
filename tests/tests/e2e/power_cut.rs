//! Power cuts (SPEC §9), not only process deaths: both servers run under the `powercut`
//! shim (`shop_tests::power`), which keeps only what fsync/fdatasync covered. A cut is a
//! `kill -9` followed by throwing away every write not synced; the servers then restart
//! on what survived.
//!
//! - With the default `--durability fsync`, every acknowledged command survives every
//!   cut, whole and once, with NATS up (the stream could hide a loss: a log behind it
//!   catches up) and with NATS down while the commands were acknowledged (the log alone
//!   holds them); the stream mirrors the log and the views equal its fold.
//! - The rig can fail: with `--durability flush` (sled's write and `sync_file_range`, no
//!   fdatasync: what "skip fdatasync" would do) a cut loses acknowledged commands, where
//!   a `kill -9` of the same run loses none.

use std::collections::HashMap;
use std::time::Duration;

use shop_tests::model::{assert_views_equal, fetch_all, Views};
use shop_tests::power::PowerRig;
use shop_tests::writers::{AnyWriter, Command, Sent};
use shop_tests::{
    assert_acknowledged_once, assert_stream_holds_log, pb, read_whole_log, req, Nats, Server,
    ServerKind,
};

const STREAM: &str = "SHOP_EVENTS";

/// A server under the rig, on its own temp data dir.
fn under_rig(kind: ServerKind, nats: &Nats, args: &[&str]) -> (Server, PowerRig) {
    let mut server = Server::in_temp_dir(kind, &nats.url(), args);
    let rig = PowerRig::new(&server.data_dir);
    server.set_env(rig.env());
    (server, rig)
}

/// A command server under the rig, serving, with product `k` created.
async fn command_with_product(nats: &Nats, args: &[&str]) -> (Server, PowerRig) {
    let (mut command, rig) = under_rig(ServerKind::Command, nats, args);
    command.spawn_until_listening();
    command.wait_serving().await;
    command
        .commands()
        .await
        .create_product(req::product("k", 100, 0))
        .await
        .expect("product");
    (command, rig)
}

/// A restock of product `k` with command id `id`.
fn restock(id: &str) -> Command {
    Command::Restock(pb::RestockProductRequest {
        command_id: id.into(),
        sku: "k".into(),
        quantity: 1,
        ..Default::default()
    })
}

/// Sends `n` restocks with fresh ids; their ids and positions.
async fn restocks(server: &Server, prefix: &str, n: usize) -> HashMap<String, u64> {
    let mut writer = AnyWriter::new(vec![server.endpoint()]);
    let mut acked = HashMap::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        match writer.send(&restock(&id), |retries| retries > 50).await {
            Sent::Answered(a) => {
                acked.insert(id, a.result.position);
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    acked
}

/// Three clients sending restocks with fresh ids until `stop`; what was answered.
async fn restocks_under_load(
    server: &Server,
    prefix: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<HashMap<String, u64>>> {
    use std::sync::atomic::Ordering;
    (0..3)
        .map(|client| {
            let endpoint = server.endpoint();
            let stop = stop.clone();
            let prefix = format!("{prefix}-c{client}");
            tokio::spawn(async move {
                let mut writer = AnyWriter::new(vec![endpoint]);
                let mut acked = HashMap::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = format!("{prefix}-{n}");
                    // The server dies under the clients: an unanswered command is dropped.
                    if let Sent::Answered(a) = writer.send(&restock(&id), |_| true).await {
                        acked.insert(id, a.result.position);
                    }
                }
                acked
            })
        })
        .collect()
}

/// Acknowledged commands missing from the log.
fn missing(log: &[pb::EventEnvelope], acked: &HashMap<String, u64>) -> usize {
    acked
        .keys()
        .filter(|id| !log.iter().any(|e| &e.command_id == *id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_survive_power_cuts() {
    let mut nats = Nats::start();
    let (mut command, command_rig) = command_with_product(&nats, &[]).await;
    let (mut query, query_rig) = under_rig(ServerKind::Query, &nats, &[]);
    query.spawn_until_listening();
    query.wait_serving().await;

    let mut acked = HashMap::new();
    let mut lost_bytes = 0;
    let rounds = shop_tests::rounds("SHOP_POWERCUT_ROUNDS", 6);
    for round in 0..rounds {
        // Every other round, NATS is down while the commands are acknowledged.
        let nats_down = round % 2 == 1;
        if nats_down {
            nats.kill();
        }
        // The cut comes under load: commands in flight, some answered an instant before.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = restocks_under_load(&command, &format!("r{round}"), stop.clone()).await;
        tokio::time::sleep(Duration::from_millis(300 + 100 * round as u64)).await;
        command.kill9();
        query.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for client in clients {
            acked.extend(client.await.expect("client"));
        }
        lost_bytes += command_rig.cut() + query_rig.cut();
        if nats_down {
            nats.restart();
        }
        command.spawn_until_listening();
        command.wait_serving().await;
        query.spawn_until_listening();
        query.wait_serving().await;
        let log = read_whole_log(&mut command.log_reader().await).await;
        assert_eq!(
            missing(&log, &acked),
            0,
            "round {round}: acknowledged commands lost in a power cut"
        );
        assert_acknowledged_once(&log, acked.iter().map(|(id, p)| (id.as_str(), *p)));
        for (i, e) in log.iter().enumerate() {
            assert_eq!(e.position, i as u64 + 1, "gapless");
        }
    }
    // The cuts did throw writes away (sled's unsynced tails, the query server's batches).
    eprintln!("bytes lost to {rounds} cuts: {lost_bytes}");

    let log = read_whole_log(&mut command.log_reader().await).await;
    assert_stream_holds_log(&nats.client().await, STREAM, &log, Duration::from_secs(30)).await;
    let mut q = query.queries().await;
    shop_tests::wait_applied(&q, log.len() as u64, Duration::from_secs(30)).await;
    assert_views_equal(
        &fetch_all(&mut q, log.len() as u64).await,
        &Views::fold(&log),
        "views after power cuts",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rig_loses_what_was_not_fsynced_where_a_kill_loses_nothing() {
    let mut nats = Nats::start();
    let (mut command, rig) = command_with_product(&nats, &["--durability", "flush"]).await;

    // NATS down: the log alone holds what is acknowledged (nothing to catch up from).
    nats.kill();
    let mut acked = restocks(&command, "killed", 200).await;
    command.kill9();
    // A kill -9 only: the page cache keeps everything, and the kernel writes it back.
    rig.settle();
    nats.restart();
    command.spawn_until_listening();
    command.wait_serving().await;
    let log = read_whole_log(&mut command.log_reader().await).await;
    assert_eq!(missing(&log, &acked), 0, "a kill -9 loses nothing");

    nats.kill();
    acked.extend(restocks(&command, "cut", 200).await);
    command.kill9();
    let lost_bytes = rig.cut();
    nats.restart();
    command.spawn_until_listening();
    command.wait_serving().await;
    let log = read_whole_log(&mut command.log_reader().await).await;
    let lost = missing(&log, &acked);
    eprintln!(
        "--durability flush: a power cut lost {lost} acknowledged commands ({lost_bytes} bytes)"
    );
    assert!(
        lost > 0,
        "without fdatasync a power cut must lose acknowledged commands ({lost_bytes} bytes thrown away)"
    );
}
