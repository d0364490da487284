//! The walking skeleton: both servers come up, report SERVING, list their services over
//! reflection, follow NATS outages in health, document their flags, shut down cleanly.

use std::time::Duration;

use shop_tests::{Nats, Server, ServerKind, Stack};
use tonic_health::pb::health_check_response::ServingStatus;

/// Service names a server lists over reflection v1 and v1alpha.
async fn reflected_services(server: &Server) -> (Vec<String>, Vec<String>) {
    use tokio_stream::StreamExt;
    use tonic_reflection_pb::{v1, v1alpha};

    let channel = server.channel().await;
    let mut v1_client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1_client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let mut v1_names = Vec::new();
    if let Some(Ok(r)) = responses.next().await {
        if let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            r.message_response
        {
            v1_names = list.service.into_iter().map(|s| s.name).collect();
        }
    }

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let mut alpha_names = Vec::new();
    if let Some(Ok(r)) = responses.next().await {
        if let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        )) = r.message_response
        {
            alpha_names = list.service.into_iter().map(|s| s.name).collect();
        }
    }
    (v1_names, alpha_names)
}

mod tonic_reflection_pb {
    pub use tonic_reflection::pb::{v1, v1alpha};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_serve_and_list_their_services() {
    let stack = Stack::start().await;
    for (server, api) in [
        (&stack.command, "shop.v1.CommandService"),
        (&stack.query, "shop.v1.QueryService"),
    ] {
        assert_eq!(
            server.health("").await,
            Some(ServingStatus::Serving),
            "{}",
            server.log()
        );
        server
            .wait_health(api, ServingStatus::Serving, Duration::from_secs(10))
            .await;
        let (v1, v1alpha) = reflected_services(server).await;
        for names in [&v1, &v1alpha] {
            for expected in [
                api,
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ] {
                assert!(
                    names.iter().any(|n| n == expected),
                    "{expected} missing from {names:?}"
                );
            }
        }
    }
    // Each server lists only what it serves.
    let (command_names, _) = reflected_services(&stack.command).await;
    assert!(!command_names.iter().any(|n| n == "shop.v1.QueryService"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_nats_outages() {
    let mut stack = Stack::start().await;
    stack
        .command
        .wait_health(
            command_server::RELAY_HEALTH_SERVICE,
            ServingStatus::Serving,
            Duration::from_secs(10),
        )
        .await;

    stack.nats.kill();
    // The query server cannot consume: NOT_SERVING. The command server still accepts
    // commands (they wait in the log), so only its relay reports the outage.
    stack
        .query
        .wait_health("", ServingStatus::NotServing, Duration::from_secs(15))
        .await;
    stack
        .command
        .wait_health(
            command_server::RELAY_HEALTH_SERVICE,
            ServingStatus::NotServing,
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(stack.command.health("").await, Some(ServingStatus::Serving));

    stack.nats.restart();
    stack
        .query
        .wait_health("", ServingStatus::Serving, Duration::from_secs(20))
        .await;
    stack
        .command
        .wait_health(
            command_server::RELAY_HEALTH_SERVICE,
            ServingStatus::Serving,
            Duration::from_secs(20),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_started_before_nats_wait_for_it_without_crashing() {
    let mut nats = Nats::start();
    let url = nats.url();
    nats.kill();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut query = Server::new(
        ServerKind::Query,
        &url,
        dir.path().join("q"),
        dir.path().to_path_buf(),
        &[],
    );
    query.spawn_until_listening();
    let mut command = Server::new(
        ServerKind::Command,
        &url,
        dir.path().join("c"),
        dir.path().to_path_buf(),
        &["--nats-startup-wait-ms", "200"],
    );
    command.spawn_until_listening();
    // From its first answer on, the query server is never SERVING while NATS is
    // unreachable (tonic-health starts the server's "" status as SERVING; the servers
    // override it before serving). Polled back to back so that an early SERVING is seen.
    // (A command server without NATS is a standby, its "" SERVING: it answers log reads.)
    {
        let server = &query;
        let until = std::time::Instant::now() + Duration::from_millis(700);
        let mut answers = 0;
        while std::time::Instant::now() < until {
            if let Some(status) = server.health("").await {
                answers += 1;
                assert_ne!(
                    status,
                    ServingStatus::Serving,
                    "query server SERVING without NATS:\n{}",
                    server.log()
                );
            }
        }
        assert!(answers > 0, "no health answer:\n{}", server.log());
    }
    query
        .wait_health("", ServingStatus::NotServing, Duration::from_secs(10))
        .await;
    command
        .wait_health(
            command_server::RELAY_HEALTH_SERVICE,
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;
    // Still alive a moment later: retrying, not crash-looping.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(query.running() && command.running());
    // Both say why they wait.
    for server in [&query, &command] {
        shop_tests::eventually(
            Duration::from_secs(10),
            "a log line saying NATS is not connected",
            || async { server.log().contains("not connected").then_some(()) },
        )
        .await;
    }

    nats.restart();
    query
        .wait_health("", ServingStatus::Serving, Duration::from_secs(20))
        .await;
    command
        .wait_health(
            command_server::RELAY_HEALTH_SERVICE,
            ServingStatus::Serving,
            Duration::from_secs(20),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_with_exit_code_zero() {
    let mut stack = Stack::start().await;
    for server in [&mut stack.query, &mut stack.command] {
        let status = server.terminate().expect("exit status");
        assert!(
            status.success(),
            "{:?} exited with {status}:\n{}",
            server.kind,
            server.log()
        );
        assert!(server.log().contains("stopped"), "{}", server.log());
    }
}

#[test]
fn help_documents_every_flag_and_its_environment_variable() {
    for binary in ["command-server", "query-server"] {
        let output = std::process::Command::new(shop_tests::bin_dir().join(binary))
            .arg("--help")
            .output()
            .expect("run --help");
        assert!(output.status.success());
        let help = String::from_utf8_lossy(&output.stdout);
        for needle in [
            "--listen",
            "--data-dir",
            "--nats-url",
            "--stream",
            "--log-format",
            "SHOP_LISTEN",
            "SHOP_DATA_DIR",
            "SHOP_NATS_URL",
            "SHOP_STREAM",
        ] {
            assert!(
                help.contains(needle),
                "{binary} --help lacks {needle}:\n{help}"
            );
        }
    }
}
