//! Limits under load: connections at once, header bytes (`shop_shared::limits`), and the
//! command queue's waiting time (`--queue-wait-max-ms`).

use std::time::Duration;

use shop_shared::pb;
use shop_tests::observability::{metrics_addr, Scrape};
use shop_tests::{
    error_metadata, eventually, parked_reads, read_whole_log_with, reason, req, Nats, Server,
    ServerKind,
};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use pb::command_service_client::CommandServiceClient;
use pb::query_service_client::QueryServiceClient;

/// A query server with no stream behind it: it answers GetStatus, enough for these tests.
fn query_server(nats: &Nats, dir: &tempfile::TempDir, extra: &[&str]) -> Server {
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut query = Server::new(
        ServerKind::Query,
        &nats.url(),
        dir.path().join("q"),
        dir.path().to_path_buf(),
        &args,
    );
    query.spawn_until_listening();
    query
}

async fn status(channel: &Channel) -> Result<pb::QueryStatus, tonic::Status> {
    let mut request = tonic::Request::new(pb::GetStatusRequest {});
    request.set_timeout(Duration::from_secs(3));
    QueryServiceClient::new(channel.clone())
        .get_status(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once_and_counted() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let query = query_server(&nats, &dir, &["--connections-max", "3"]);
    let metrics = metrics_addr(&query).await;

    let mut open = Vec::new();
    for _ in 0..3 {
        let channel = query.channel().await;
        status(&channel).await.expect("within the limit");
        open.push(channel);
    }
    // The fourth connection is accepted and closed: the client fails fast.
    let started = std::time::Instant::now();
    let fourth = match query.try_channel_with(None).await {
        Ok(channel) => status(&channel).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(fourth.is_err(), "a fourth connection was served");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not after a timeout"
    );
    let scrape = Scrape::from(metrics).await;
    assert!(scrape.value_or_zero("shop_connections_refused_total", &[]) >= 1.0);
    assert_eq!(scrape.value("shop_connections_open", &[]), Some(3.0));
    // The connections already open were not disturbed.
    for channel in &open {
        status(channel)
            .await
            .expect("open connections still served");
    }
    // Once one closes, its place is free again.
    open.pop();
    eventually(
        Duration::from_secs(10),
        "a connection after one closed",
        || {
            let query = &query;
            async move {
                let channel = query.try_channel_with(None).await.ok()?;
                status(&channel).await.ok().map(|_| channel)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_beyond_header_bytes_max_is_refused_and_the_server_keeps_serving() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let query = query_server(&nats, &dir, &["--header-bytes-max", "4096"]);
    let channel = query.channel().await;
    let with_metadata = |bytes: usize| {
        let mut request = tonic::Request::new(pb::GetStatusRequest {});
        request.set_timeout(Duration::from_secs(3));
        let value: MetadataValue<_> = "x".repeat(bytes).parse().expect("ascii metadata");
        request.metadata_mut().insert("x-padding", value);
        request
    };
    let mut q = QueryServiceClient::new(channel.clone());
    q.get_status(with_metadata(2048))
        .await
        .expect("2 KiB of metadata is within 4 KiB");
    let refused = q.get_status(with_metadata(8192)).await;
    assert!(refused.is_err(), "8 KiB of metadata was accepted");
    // The server, and a new connection to it, still serve.
    let fresh = query.channel().await;
    status(&fresh).await.expect("served after the refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_server_wide_limit_are_shed_whatever_the_connections() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let query = query_server(&nats, &dir, &["--requests-max", "6"]);
    // Twenty-four parked reads over four connections (six each, within the default
    // per-connection limit): at most six may be in flight on the server at once.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(query.channel().await);
    }
    let parked = channels
        .iter()
        .map(|c| parked_reads(c, 6, Duration::from_secs(3)));
    // Health checks are never shed, even on a connection and a server at their limits.
    let probe = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        request.set_timeout(Duration::from_secs(2));
        HealthClient::new(channels[0].clone()).check(request).await
    };
    let (parked, probe) = tokio::join!(futures::future::join_all(parked), probe);
    probe.expect("health answered while the server is at its in-flight limit");
    let (mut held, mut shed) = (0, 0);
    for (code, waited) in parked.into_iter().flatten() {
        match code {
            Code::Unavailable => held += 1,
            Code::ResourceExhausted => {
                assert!(waited < Duration::from_secs(1), "shed at once");
                shed += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (1..=6).contains(&held),
        "{held} requests held a slot (limit 6)"
    );
    assert_eq!(held + shed, 24);
    status(&channels[0])
        .await
        .expect("served again once they are done");
}

/// Under a burst far beyond what the writer takes in `--queue-wait-max-ms`, commands that
/// waited longer are refused with RESOURCE_EXHAUSTED (OVERLOADED, queue_wait_max_ms) and
/// wrote nothing: the log holds exactly the accepted ones, and a refused command id
/// retried later is accepted as new, not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_waited_too_long_are_shed_and_wrote_nothing() {
    const COMMANDS: usize = 3_000;
    let nats = Nats::start();
    // The server-wide in-flight limit raised above the burst: the queue's admission alone
    // sheds here.
    let flags = ["--queue-wait-max-ms", "2", "--requests-max", "10000"];
    let command = Server::start(ServerKind::Command, &nats, &flags).await;
    let mut channels = Vec::new();
    for _ in 0..6 {
        channels.push(command.channel().await);
    }
    let request = |i: usize| {
        let mut r = req::register(&format!("burst{i}"), &format!("burst{i}@example.com"));
        r.command_id = format!("burst-cmd-{i}");
        r
    };
    let sends = (0..COMMANDS).map(|i| {
        let mut c = CommandServiceClient::new(channels[i % channels.len()].clone());
        let r = request(i);
        async move { (i, c.register_customer(r).await) }
    });
    let answers = futures::future::join_all(sends).await;
    let (mut accepted, mut shed) = (Vec::new(), Vec::new());
    for (i, answer) in answers {
        match answer {
            Ok(_) => accepted.push(i),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status).as_deref(), Some("OVERLOADED"));
                let metadata = error_metadata(&status);
                assert_eq!(
                    metadata.get("queue_wait_max_ms").map(String::as_str),
                    Some("2")
                );
                shed.push(i);
            }
        }
    }
    assert!(!accepted.is_empty(), "nothing was admitted");
    assert!(
        !shed.is_empty(),
        "{COMMANDS} commands at once never waited 2 ms"
    );

    let log = read_whole_log_with(&channels[0], None).await;
    let mut written: Vec<usize> = log
        .iter()
        .filter_map(|e| e.command_id.strip_prefix("burst-cmd-"))
        .map(|i| i.parse().expect("a burst index"))
        .collect();
    written.sort_unstable();
    accepted.sort_unstable();
    assert_eq!(
        written, accepted,
        "the log holds exactly the accepted commands"
    );

    // A refused command was never recorded: retried (once admission is open again), it
    // is decided as a new command.
    let retried = shed[0];
    let answer = eventually(Duration::from_secs(10), "the retried command", || {
        let mut c = CommandServiceClient::new(channels[0].clone());
        let r = request(retried);
        async move { c.register_customer(r).await.ok() }
    })
    .await;
    assert!(
        !answer.metadata().contains_key("shop-replayed"),
        "a refused command was replayed as if it had been written"
    );
}
