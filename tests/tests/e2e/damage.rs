//! Damaged storage (SPEC §9): the data files of a stopped server are truncated, zeroed,
//! corrupted in the middle or deleted, and the server is started again. It either
//! serves everything it had, or recovers to a consistent prefix (sled replays its log up
//! to the first damaged record), and never serves or publishes wrong data: a command log
//! that lost its end is refused by the relay's mirror check, naming the data file; a view
//! store that lost its end is rebuilt from the stream.

use std::path::Path;
use std::time::Duration;

use shop_tests::{
    eventually, pb, read_stream, read_whole_log, req, stream_last_sequence, Nats, Server,
    ServerKind,
};

use shop_tests::model::{assert_views_equal, fetch_all, Views};

const STREAM: &str = "SHOP_EVENTS";
const EVENTS: usize = 300;

/// One way of damaging a data dir.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// The last 3,000 bytes of the data file cut off.
    TruncateTail,
    /// The last 4 KiB of the data file zeroed.
    ZeroTail,
    /// sled's `conf` file deleted.
    DeleteConf,
    /// 64 bytes in the middle of the data file inverted.
    FlipMiddle,
    /// The data file deleted.
    DeleteData,
    /// Every byte of sled's snapshot files inverted (sled refuses to open; a power cut
    /// or a full disk leaves snapshots it cannot use).
    CorruptSnapshots,
}

fn damage(dir: &Path, how: Damage) {
    let db = dir.join("db");
    match how {
        Damage::TruncateTail => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&db)
                .expect("open");
            let len = f.metadata().expect("metadata").len();
            f.set_len(len.saturating_sub(3000)).expect("truncate");
        }
        Damage::ZeroTail | Damage::FlipMiddle => {
            let mut bytes = std::fs::read(&db).expect("read");
            let n = bytes.len();
            let range = match how {
                Damage::ZeroTail => n.saturating_sub(4096)..n,
                _ => n / 2..n / 2 + 64,
            };
            for b in &mut bytes[range] {
                *b = if matches!(how, Damage::ZeroTail) {
                    0
                } else {
                    !*b
                };
            }
            std::fs::write(&db, bytes).expect("write");
        }
        Damage::DeleteConf => std::fs::remove_file(dir.join("conf")).expect("delete conf"),
        Damage::DeleteData => std::fs::remove_file(&db).expect("delete db"),
        Damage::CorruptSnapshots => {
            let snapshots: Vec<_> = std::fs::read_dir(dir)
                .expect("list")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
                .map(|e| e.path())
                .collect();
            assert!(!snapshots.is_empty(), "no snapshot in {}", dir.display());
            for path in snapshots {
                let bytes: Vec<u8> = std::fs::read(&path)
                    .expect("read")
                    .iter()
                    .map(|b| !b)
                    .collect();
                std::fs::write(&path, bytes).expect("write");
            }
        }
    }
}

/// For damage to snapshots: sled writes its snapshot when it opens a database with
/// something in it, so the stopped server is started and stopped once more.
async fn opened_again(server: &mut Server, how: Damage) {
    if matches!(how, Damage::CorruptSnapshots) {
        server.restart().await;
        server.terminate();
    }
}

/// A command server with `EVENTS` events in its log and the stream, stopped cleanly.
async fn stopped_server(nats: &Nats) -> (Server, Vec<pb::EventEnvelope>) {
    let mut server = Server::start(ServerKind::Command, nats, &["--no-policy"]).await;
    let mut c = server.commands().await;
    for i in 0..EVENTS {
        c.register_customer(req::register(&format!("c{i}"), &format!("c{i}@x.io")))
            .await
            .expect("register");
    }
    let log = read_whole_log(&mut server.log_reader().await).await;
    eventually(
        Duration::from_secs(20),
        "the stream to hold the log",
        || async { (stream_last_sequence(nats, STREAM).await >= EVENTS as u64).then_some(()) },
    )
    .await;
    server.terminate();
    (server, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_command_log_serves_what_it_had_or_catches_up_from_the_stream() {
    for how in [
        Damage::TruncateTail,
        Damage::ZeroTail,
        Damage::DeleteConf,
        Damage::CorruptSnapshots,
    ] {
        let nats = Nats::start();
        let (mut server, before) = stopped_server(&nats).await;
        opened_again(&mut server, how).await;
        damage(&server.data_dir, how);
        server.restart().await;
        let after = read_whole_log(&mut server.log_reader().await).await;
        assert_eq!(after, before, "{how:?}: the log serves everything it had");
    }
    for how in [Damage::FlipMiddle, Damage::DeleteData] {
        let nats = Nats::start();
        let (mut server, before) = stopped_server(&nats).await;
        damage(&server.data_dir, how);
        server.spawn_until_listening();
        server.wait_log_serving().await;
        let cut = server.log();
        // A prefix of the stream: caught up from it before it writes (and before it says
        // so), the same events again; nothing published from the damaged log.
        server.wait_serving().await;
        let after = read_whole_log(&mut server.log_reader().await).await;
        assert_eq!(after, before, "{how:?}: caught up from the stream:\n{cut}");
        assert!(
            server
                .log()
                .contains("claimed the writer lease; catching up"),
            "{how:?}"
        );
        assert_eq!(read_stream(&nats, STREAM).await.len(), EVENTS, "{how:?}");
    }
}

/// Without a stream to compare with, a log damaged in the middle serves a consistent
/// prefix of what it had: the same events, gapless, never altered ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_damaged_in_the_middle_recovers_to_a_prefix_of_its_events() {
    let mut nats = Nats::start();
    let (mut server, before) = stopped_server(&nats).await;
    nats.kill();
    damage(&server.data_dir, Damage::FlipMiddle);
    // Without NATS it is a standby (no lease), serving its log.
    server.spawn_until_listening();
    server.wait_log_serving().await;
    let after = read_whole_log(&mut server.log_reader().await).await;
    assert!(after.len() < before.len(), "the damage cut the log short");
    assert_eq!(after[..], before[..after.len()], "a prefix, unaltered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_view_store_is_rebuilt_from_the_stream() {
    for how in [
        Damage::TruncateTail,
        Damage::ZeroTail,
        Damage::DeleteConf,
        Damage::FlipMiddle,
        Damage::DeleteData,
        Damage::CorruptSnapshots,
    ] {
        let nats = Nats::start();
        let command = Server::start(ServerKind::Command, &nats, &["--no-policy"]).await;
        let mut query = Server::start(ServerKind::Query, &nats, &[]).await;
        let mut c = command.commands().await;
        for i in 0..EVENTS {
            c.register_customer(req::register(&format!("c{i}"), &format!("c{i}@x.io")))
                .await
                .expect("register");
        }
        let log = read_whole_log(&mut command.log_reader().await).await;
        let position = log.len() as u64;
        let mut q = query.queries().await;
        fetch_all(&mut q, position).await;
        query.terminate();
        opened_again(&mut query, how).await;
        damage(&query.data_dir, how);
        query.restart().await;
        let mut q = query.queries().await;
        assert_views_equal(
            &fetch_all(&mut q, position).await,
            &Views::fold(&log),
            &format!("{how:?}"),
        );
    }
}
