//! Security (README: Running securely), black-box with real TLS: plaintext and untrusted clients
//! refused, mTLS handshakes, every role boundary of both servers in both directions, the
//! `actor` of every event (token name, JWT subject, certificate subject, policy), bad
//! credentials that write nothing, the tokens file reloaded on SIGHUP, NATS users with
//! permissions over TLS.

use std::time::Duration;

use shop_tests::security::{
    bearer, nats_user_permissions, nats_users_config, write_tokens, JwtKeys, NatsOperator, Pki,
};
use shop_tests::{code, eventually, pb, reason, req, Nats, Server, ServerKind};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const WAIT: Duration = Duration::from_secs(15);
const WRITER: &str = "writer-secret-token";
const READER: &str = "reader-secret-token";
const ADMIN: &str = "admin-secret-token";

fn args(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

/// A tokens file with one token per role (named orders-svc, reports, ops).
fn tokens_file(dir: &std::path::Path, subjects: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("tokens");
    write_tokens(
        &path,
        &[
            ("writer", WRITER, "orders-svc"),
            ("reader", READER, "reports"),
            ("admin", ADMIN, "ops"),
        ],
        subjects,
    );
    path
}

/// Server flags: the tokens file of [`tokens_file`] and `jwt`'s public key.
fn tokens_and_jwt_args(dir: &std::path::Path, jwt: &JwtKeys) -> Vec<String> {
    vec![
        "--auth-tokens".to_string(),
        tokens_file(dir, &[]).display().to_string(),
        "--auth-jwt-key".to_string(),
        jwt.public_key_path.display().to_string(),
    ]
}

/// `message`, with a bearer token when one is given.
fn maybe_bearer<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    match token {
        Some(token) => bearer(message, token),
        None => tonic::Request::new(message),
    }
}

async fn register(
    channel: &Channel,
    token: Option<&str>,
    id: &str,
) -> Result<pb::CommandResult, tonic::Status> {
    let mut client = pb::command_service_client::CommandServiceClient::new(channel.clone());
    client
        .register_customer(maybe_bearer(
            req::register(id, &format!("{id}@example.com")),
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn log_status(
    channel: &Channel,
    token: Option<&str>,
) -> Result<pb::LogStatus, tonic::Status> {
    let mut client = pb::log_service_client::LogServiceClient::new(channel.clone());
    client
        .get_log_status(maybe_bearer(pb::GetLogStatusRequest {}, token))
        .await
        .map(tonic::Response::into_inner)
}

/// The code of a reflection v1 `ListServices` call made without credentials.
async fn reflection_code(channel: &Channel) -> Code {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, ServerReflectionRequest,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel.clone());
    match client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
    {
        Ok(mut responses) => match responses.get_mut().message().await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        },
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn tls_refuses_plaintext_and_untrusted_clients() {
    let pki = Pki::new();
    let nats = Nats::start();
    let tls_args = pki.server_args(false);
    let command = Server::start_tls(
        ServerKind::Command,
        &nats,
        &args(&tls_args),
        Some(pki.client_tls(None)),
    )
    .await;
    let mut query_args = tls_args.clone();
    query_args.extend(["--requests-per-connection-max".into(), "4".into()]);
    let query = Server::start_tls(
        ServerKind::Query,
        &nats,
        &args(&query_args),
        Some(pki.client_tls(None)),
    )
    .await;

    // A plaintext client gets no answer from a TLS server.
    if let Ok(plain) = command.try_channel_with(None).await {
        let refused = register(&plain, None, "plain").await;
        assert!(refused.is_err(), "plaintext request answered: {refused:?}");
    }
    // A TLS client that trusts another CA fails the handshake.
    let stranger = Pki::new();
    match command
        .try_channel_with(Some(stranger.client_tls(None)))
        .await
    {
        Err(_) => {}
        Ok(channel) => assert!(register(&channel, None, "stranger").await.is_err()),
    }
    // The trusted client is served by both servers.
    let channel = command.channel().await;
    let result = register(&channel, None, "c1")
        .await
        .expect("register over TLS");
    assert_eq!(
        result.position, 1,
        "only the trusted client's command was written"
    );
    let mut queries = query.queries().await;
    eventually(WAIT, "query server over TLS applies the event", || {
        let mut queries = queries.clone();
        async move {
            let customer = queries
                .get_customer(pb::GetCustomerRequest {
                    customer_id: "c1".into(),
                    ..Default::default()
                })
                .await
                .ok()?;
            Some(customer)
        }
    })
    .await;
    let status = queries
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status over TLS");
    assert_eq!(status.into_inner().applied_position, 1);

    // The per-connection in-flight limit holds over TLS too: four of ten parked reads
    // hold a slot until their deadline, the other six are shed.
    let codes = shop_tests::parked_reads(&query.channel().await, 10, Duration::from_secs(3)).await;
    let shed = codes
        .iter()
        .filter(|(code, _)| *code == Code::ResourceExhausted)
        .count();
    assert_eq!(shed, 6, "{codes:?}");
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_and_its_subject_is_the_actor() {
    let pki = Pki::new();
    let nats = Nats::start();
    let tokens = tokens_file(pki.dir(), &[("writer", "CN=orders-svc")]);
    let mut server_args = pki.server_args(true);
    server_args.extend(["--auth-tokens".into(), tokens.display().to_string()]);
    let command = Server::start_tls(
        ServerKind::Command,
        &nats,
        &args(&server_args),
        Some(pki.client_tls(Some(pki.client_identity("harness")))),
    )
    .await;

    // No certificate: the handshake fails, no handler is reached.
    match command.try_channel_with(Some(pki.client_tls(None))).await {
        Err(_) => {}
        Ok(channel) => {
            let refused = register(&channel, Some(WRITER), "no-cert").await;
            assert!(
                refused.is_err(),
                "answered without a client certificate: {refused:?}"
            );
        }
    }
    // A certificate from another CA: refused too.
    let stranger = Pki::new();
    let foreign = pki.client_tls(Some(stranger.client_identity("orders-svc")));
    match command.try_channel_with(Some(foreign)).await {
        Err(_) => {}
        Ok(channel) => assert!(register(&channel, None, "foreign").await.is_err()),
    }

    // A mapped subject writes with no token; its subject is the actor.
    let mapped = command
        .try_channel_with(Some(
            pki.client_tls(Some(pki.client_identity("orders-svc"))),
        ))
        .await
        .expect("mTLS handshake");
    register(&mapped, None, "by-cert")
        .await
        .expect("mapped certificate may write");
    // A certified but unmapped subject is authenticated with no roles.
    let unmapped = command
        .try_channel_with(Some(pki.client_tls(Some(pki.client_identity("stranger")))))
        .await
        .expect("mTLS handshake");
    let denied = register(&unmapped, None, "unmapped")
        .await
        .expect_err("no roles");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // A token takes precedence over the certificate.
    register(&unmapped, Some(WRITER), "by-token")
        .await
        .expect("token may write");

    let events = shop_tests::read_whole_log_with(&mapped, Some(ADMIN)).await;
    let actors: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.stream_id.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        actors,
        [
            ("customer-by-cert", "CN=orders-svc"),
            ("customer-by-token", "orders-svc")
        ]
    );
}

#[tokio::test]
async fn roles_are_enforced_on_every_service_in_both_directions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = tokens_file(dir.path(), &[]);
    let auth = ["--auth-tokens".to_string(), tokens.display().to_string()];
    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &args(&auth)).await;
    let mut query_args = auth.to_vec();
    query_args.extend(["--reflection".into(), "off".into()]);
    let query = Server::start(ServerKind::Query, &nats, &args(&query_args)).await;
    let commands = command.channel().await;
    let queries = query.channel().await;

    // CommandService: writer and admin.
    let cases = [
        (None, Code::Unauthenticated),
        (Some(READER), Code::PermissionDenied),
        (Some(WRITER), Code::Ok),
        (Some(ADMIN), Code::Ok),
    ];
    for (i, (token, expected)) in cases.iter().enumerate() {
        let answer = register(&commands, *token, &format!("c{i}")).await;
        assert_eq!(
            code(&answer),
            *expected,
            "RegisterCustomer as {token:?}: {answer:?}"
        );
    }
    // LogService: reader and admin.
    let cases = [
        (None, Code::Unauthenticated),
        (Some(WRITER), Code::PermissionDenied),
        (Some(READER), Code::Ok),
        (Some(ADMIN), Code::Ok),
    ];
    for (token, expected) in cases {
        let answer = log_status(&commands, token).await;
        assert_eq!(
            code(&answer),
            expected,
            "GetLogStatus as {token:?}: {answer:?}"
        );
    }
    let refused = log_status(&commands, Some(WRITER))
        .await
        .expect_err("writer");
    assert_eq!(reason(&refused).as_deref(), Some("MISSING_ROLE"));
    let refused = log_status(&commands, None).await.expect_err("nobody");
    assert_eq!(reason(&refused).as_deref(), Some("MISSING_CREDENTIALS"));

    // QueryService: reader and admin; a refused caller learns nothing (no freshness).
    let mut client = pb::query_service_client::QueryServiceClient::new(queries.clone());
    for (token, expected) in [
        (None, Code::Unauthenticated),
        (Some(WRITER), Code::PermissionDenied),
        (Some(READER), Code::Ok),
        (Some(ADMIN), Code::Ok),
    ] {
        let answer = client
            .get_status(maybe_bearer(pb::GetStatusRequest {}, token))
            .await;
        assert_eq!(
            code(&answer),
            expected,
            "GetStatus as {token:?}: {answer:?}"
        );
        if let Err(status) = &answer {
            assert!(status.metadata().get("shop-applied-position").is_none());
        }
    }
    eventually(WAIT, "reader sees the writer's customer", || {
        let mut client = client.clone();
        async move {
            client
                .get_customer(bearer(
                    pb::GetCustomerRequest {
                        customer_id: "c2".into(),
                        ..Default::default()
                    },
                    READER,
                ))
                .await
                .ok()
        }
    })
    .await;

    // Health stays open; reflection is open unless switched off.
    assert_eq!(command.health("").await, Some(ServingStatus::Serving));
    assert_eq!(
        query.health("shop.v1.QueryService").await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(reflection_code(&commands).await, Code::Ok);
    assert_eq!(reflection_code(&queries).await, Code::Unimplemented);
}

#[tokio::test]
async fn actor_of_every_event_is_in_the_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jwt = JwtKeys::ed25519();
    let auth = tokens_and_jwt_args(dir.path(), &jwt);
    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &args(&auth)).await;
    let query = Server::start(ServerKind::Query, &nats, &args(&auth)).await;
    let mut commands = command.commands().await;

    commands
        .register_customer(bearer(req::register("c1", "c1@example.com"), WRITER))
        .await
        .expect("register");
    commands
        .create_product(bearer(req::product("p1", 500, 10), WRITER))
        .await
        .expect("product");
    let alice = jwt.sign(&JwtKeys::claims("alice", &["writer", "auditor"], 300));
    commands
        .place_order(bearer(req::order("o1", "c1", &[("p1", 2)]), &alice))
        .await
        .expect("alice places an order with her JWT");
    let readonly = jwt.sign(&JwtKeys::claims("bob", &["reader"], 300));
    let denied = commands
        .pay_order(bearer(req::pay("o1", 1000), &readonly))
        .await
        .expect_err("a reader's JWT may not write");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let deleted = commands
        .delete_customer(bearer(
            pb::DeleteCustomerRequest {
                customer_id: "c1".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .expect("admin deletes the customer")
        .into_inner();

    let mut queries = query.queries().await;
    let history = |stream: &'static str| {
        let queries = queries.clone();
        async move {
            let mut queries = queries;
            queries
                .get_history(bearer(
                    pb::GetHistoryRequest {
                        stream_id: stream.into(),
                        ..Default::default()
                    },
                    READER,
                ))
                .await
                .map(|r| r.into_inner().events)
        }
    };
    let order = eventually(WAIT, "the policy cancels the order", || async {
        let events = history("order-o1").await.ok()?;
        (events.len() == 2).then_some(events)
    })
    .await;
    let customer = eventually(WAIT, "the deletion is applied", || async {
        let events = history("customer-c1").await.ok()?;
        (events.len() == 2).then_some(events)
    })
    .await;
    let who = |events: &[pb::HistoryEvent]| {
        events
            .iter()
            .map(|e| (e.event_type.clone(), e.actor.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        who(&customer),
        [
            ("CustomerRegistered".to_string(), "orders-svc".to_string()),
            ("CustomerDeleted".to_string(), "ops".to_string())
        ]
    );
    assert_eq!(
        who(&order),
        [
            ("OrderPlaced".to_string(), "alice".to_string()),
            (
                "OrderCancelled".to_string(),
                "policy:customer-deleted".to_string()
            )
        ]
    );
    let deletion_event = &customer[1];
    assert_eq!(deletion_event.position, deleted.position);
    assert_eq!(
        order[1].causation_id, deletion_event.event_id,
        "the policy's command is caused by the deletion event"
    );
    // The command server's log says the same.
    let channel = command.channel().await;
    let log = shop_tests::read_whole_log_with(&channel, Some(READER)).await;
    let product = log
        .iter()
        .find(|e| e.stream_id == "product-p1")
        .expect("product event");
    assert_eq!(product.actor, "orders-svc");
    drop(
        queries
            .get_status(bearer(pb::GetStatusRequest {}, READER))
            .await,
    );
}

#[tokio::test]
async fn bad_credentials_are_unauthenticated_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jwt = JwtKeys::rsa();
    let auth = tokens_and_jwt_args(dir.path(), &jwt);
    let nats = Nats::start();
    let mut command = Server::start(ServerKind::Command, &nats, &args(&auth)).await;
    let channel = command.channel().await;

    let valid = jwt.sign(&JwtKeys::claims("carol", &["writer"], 300));
    let (head, rest) = valid.split_once('.').expect("jwt");
    let (payload, signature) = rest.split_once('.').expect("jwt");
    let forged_payload = {
        use base64::Engine;
        let claims = JwtKeys::claims("carol", &["admin"], 300).to_string();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
    };
    // One character in the middle of the signature changed (to another one, always).
    let flipped = {
        let mut s = signature.to_string();
        let middle = s.len() / 2;
        let other = if &s[middle..=middle] == "A" { "B" } else { "A" };
        s.replace_range(middle..=middle, other);
        assert_ne!(s, signature);
        s
    };
    let other_key = JwtKeys::ed25519();
    let hs256 = {
        let public = std::fs::read(&jwt.public_key_path).expect("public key");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &JwtKeys::claims("mallory", &["admin"], 300),
            &jsonwebtoken::EncodingKey::from_secret(&public),
        )
        .expect("hs256")
    };
    let no_exp = jwt.sign(&serde_json::json!({"sub": "dave", "roles": ["writer"]}));
    let no_sub = jwt.sign(&serde_json::json!({"roles": ["writer"], "exp": 4_000_000_000u64}));
    let bad_tokens: Vec<(&str, String, &str)> = vec![
        (
            "expired JWT",
            jwt.sign(&JwtKeys::claims("carol", &["writer"], -3600)),
            "TOKEN_EXPIRED",
        ),
        (
            "tampered signature",
            format!("{head}.{payload}.{flipped}"),
            "INVALID_TOKEN",
        ),
        (
            "tampered claims",
            format!("{head}.{forged_payload}.{signature}"),
            "INVALID_TOKEN",
        ),
        (
            "signed by another key",
            other_key.sign(&JwtKeys::claims("carol", &["writer"], 300)),
            "INVALID_TOKEN",
        ),
        (
            "HS256 with the public key as secret",
            hs256,
            "INVALID_TOKEN",
        ),
        (
            "alg none",
            format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}."),
            "INVALID_TOKEN",
        ),
        ("JWT without exp", no_exp, "INVALID_TOKEN"),
        ("JWT without sub", no_sub, "INVALID_TOKEN"),
        ("JWT shape, garbage inside", "a.b.c".into(), "INVALID_TOKEN"),
        (
            "unknown static token",
            "not-a-token".into(),
            "UNKNOWN_TOKEN",
        ),
        (
            "oversized token",
            "x".repeat(9 * 1024),
            "MALFORMED_AUTHORIZATION",
        ),
    ];
    for (what, token, expected) in &bad_tokens {
        let refused = register(&channel, Some(token), "x").await.expect_err(what);
        assert_eq!(refused.code(), Code::Unauthenticated, "{what}: {refused:?}");
        assert_eq!(reason(&refused).as_deref(), Some(*expected), "{what}");
    }
    let raw_headers: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("Basic scheme", vec![b"Basic dXNlcjpwYXNz".to_vec()]),
        ("scheme only", vec![b"Bearer".to_vec()]),
        ("two spaces", vec![format!("Bearer  {WRITER}").into_bytes()]),
        ("non-ASCII bytes", vec![b"Bearer \x80\xff\xfe".to_vec()]),
        ("no scheme", vec![WRITER.as_bytes().to_vec()]),
        (
            "two headers",
            vec![format!("Bearer {WRITER}").into_bytes(); 2],
        ),
    ];
    let mut client = pb::command_service_client::CommandServiceClient::new(channel.clone());
    for (what, values) in raw_headers {
        let mut request = tonic::Request::new(req::register("x", "x@example.com"));
        for value in values {
            let value =
                tonic::metadata::MetadataValue::try_from(value.as_slice()).expect("header bytes");
            request.metadata_mut().append("authorization", value);
        }
        let refused = client.register_customer(request).await.expect_err(what);
        assert_eq!(refused.code(), Code::Unauthenticated, "{what}: {refused:?}");
        assert_eq!(
            reason(&refused).as_deref(),
            Some("MALFORMED_AUTHORIZATION"),
            "{what}"
        );
    }
    // Beyond the HTTP/2 header limit the request is refused before it is read.
    let huge = register(&channel, Some(&"y".repeat(64 * 1024)), "x").await;
    assert!(huge.is_err(), "a 64 KiB token was accepted");

    // Nothing was written, the server is up, a good token still works.
    assert!(command.running(), "server died:\n{}", command.log());
    let channel = command.channel().await;
    assert_eq!(
        log_status(&channel, Some(ADMIN))
            .await
            .expect("status")
            .log_position,
        0
    );
    register(&channel, Some(&valid), "carol-1")
        .await
        .expect("valid RS256 JWT writes");
    assert!(!command.log().contains(WRITER), "a token was logged");
}

#[tokio::test]
async fn sighup_reloads_the_tokens_file_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens");
    write_tokens(&path, &[("writer", "first", "first-svc")], &[]);
    let auth = ["--auth-tokens".to_string(), path.display().to_string()];
    let nats = Nats::start();
    let mut command = Server::start(ServerKind::Command, &nats, &args(&auth)).await;
    let pid = command.pid().expect("pid");
    let channel = command.channel().await;
    register(&channel, Some("first"), "a")
        .await
        .expect("first token");
    assert_eq!(
        code(&register(&channel, Some("second"), "b").await),
        Code::Unauthenticated
    );

    write_tokens(&path, &[("writer", "second", "second-svc")], &[]);
    shop_tests::signal(pid, "HUP");
    eventually(WAIT, "the second token is accepted", || {
        let channel = channel.clone();
        async move { register(&channel, Some("second"), "b").await.ok() }
    })
    .await;
    assert_eq!(
        code(&register(&channel, Some("first"), "c").await),
        Code::Unauthenticated,
        "a removed token still works"
    );

    // A broken file is not loaded: the tokens in force stay.
    std::fs::write(&path, "superuser 1234\n").expect("write");
    shop_tests::signal(pid, "HUP");
    eventually(WAIT, "the failed reload is logged", || {
        let log = command.log();
        async move { log.contains("tokens file not reloaded").then_some(()) }
    })
    .await;
    register(&channel, Some("second"), "d")
        .await
        .expect("tokens kept");
    assert!(command.running());
    assert_eq!(command.pid(), Some(pid), "no restart");
}

#[tokio::test]
async fn nats_users_and_tls_confine_the_query_server_to_reading() {
    let pki = Pki::new();
    let nats = Nats::start_with_config(Some(&nats_users_config(
        "command-pw",
        "query-pw",
        Some(&pki),
    )));
    let ca = pki.path("ca.pem").display().to_string();
    let nats_args = |user: &str, password: &str| {
        vec![
            "--nats-user".to_string(),
            user.to_string(),
            "--nats-password".to_string(),
            password.to_string(),
            "--nats-tls-ca".to_string(),
            ca.clone(),
        ]
    };
    let command = Server::start(
        ServerKind::Command,
        &nats,
        &args(&nats_args("command", "command-pw")),
    )
    .await;
    let query = Server::start(
        ServerKind::Query,
        &nats,
        &args(&nats_args("query", "query-pw")),
    )
    .await;
    command
        .wait_health("shop.v1.Relay", ServingStatus::Serving, WAIT)
        .await;

    let mut queries = command_reaches_query(&command, &query).await;

    // The query server's user may not publish events.
    let intruder = async_nats::ConnectOptions::new()
        .user_and_password("query".into(), "query-pw".into())
        .add_root_certificates(pki.path("ca.pem"))
        .require_tls(true);
    assert_publish_refused(intruder, &nats).await;
    // Without the password no one gets in.
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(pki.path("ca.pem"))
        .require_tls(true)
        .connect(nats.url())
        .await;
    assert!(
        anonymous.is_err(),
        "NATS accepted a client without credentials"
    );

    // The stream holds exactly the one event, and the query server is still applying.
    let status = queries
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        (status.applied_position, status.stream_last_sequence),
        (1, 1)
    );
    assert_eq!(query.health("").await, Some(ServingStatus::Serving));
    assert_servers_never_refused(&nats);
}

#[tokio::test]
async fn unusable_security_files_stop_the_server_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.pem").display().to_string();
    let bad_tokens = dir.path().join("bad-tokens");
    std::fs::write(&bad_tokens, "writer not-a-hash\n").expect("write");
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(
        &not_a_key,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .expect("write");
    let bad_creds = dir.path().join("bad.creds");
    std::fs::write(&bad_creds, "no jwt here\n").expect("write");
    let nats = Nats::start();
    let cases: Vec<(ServerKind, Vec<String>, String)> = vec![
        (
            ServerKind::Command,
            vec![
                "--tls-cert".into(),
                missing.clone(),
                "--tls-key".into(),
                missing.clone(),
            ],
            missing.clone(),
        ),
        (
            ServerKind::Query,
            vec!["--auth-tokens".into(), bad_tokens.display().to_string()],
            format!("{} line 1", bad_tokens.display()),
        ),
        (
            ServerKind::Command,
            vec!["--auth-jwt-key".into(), not_a_key.display().to_string()],
            not_a_key.display().to_string(),
        ),
        (
            ServerKind::Command,
            vec!["--nats-creds".into(), missing.clone()],
            missing.clone(),
        ),
        (
            ServerKind::Query,
            vec!["--nats-creds".into(), bad_creds.display().to_string()],
            bad_creds.display().to_string(),
        ),
    ];
    for (i, (kind, flags, named)) in cases.into_iter().enumerate() {
        let run = dir.path().join(format!("run-{i}"));
        let mut server = Server::new(
            kind,
            &nats.url(),
            run.join("data"),
            dir.path().to_path_buf(),
            &args(&flags),
        );
        server.spawn();
        let status = server
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{flags:?}: still running:\n{}", server.log()));
        assert!(!status.success(), "{flags:?}: exit {status}");
        assert!(
            server.log().contains(&named),
            "{flags:?}: the error names {named}:\n{}",
            server.log()
        );
    }
}

/// Registers customer c1 and waits until the query server has it: events flow from the
/// command server through NATS to the query server. A query client for more checks.
async fn command_reaches_query(
    command: &Server,
    query: &Server,
) -> pb::query_service_client::QueryServiceClient<Channel> {
    command
        .commands()
        .await
        .register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    let queries = query.queries().await;
    eventually(WAIT, "events reach the query server through NATS", || {
        let mut queries = queries.clone();
        async move {
            queries
                .get_customer(pb::GetCustomerRequest {
                    customer_id: "c1".into(),
                    ..Default::default()
                })
                .await
                .ok()
        }
    })
    .await;
    queries
}

/// Connects with `options` and publishes an event: NATS must refuse it (no stream ack,
/// a permissions violation reported to the client and logged by the server).
async fn assert_publish_refused(options: async_nats::ConnectOptions, nats: &Nats) {
    let (errors_tx, mut errors_rx) = tokio::sync::mpsc::unbounded_channel();
    let intruder = options
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                let _ = errors_tx.send(event.to_string());
            }
        })
        .connect(nats.url())
        .await
        .expect("the query server's user connects");
    let mut js = async_nats::jetstream::new(intruder.clone());
    js.set_timeout(Duration::from_secs(2));
    let forged = js
        .publish("shop.events.customer.forged", "forged".into())
        .await;
    let acked = match forged {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(
        !acked,
        "NATS accepted a publish from the query server's user"
    );
    let violation = eventually(WAIT, "NATS reports the permission violation", || {
        let next = errors_rx.try_recv().ok();
        async move { next.filter(|e| e.to_lowercase().contains("permissions violation")) }
    })
    .await;
    assert!(
        violation.contains("shop.events.customer.forged"),
        "{violation}"
    );

    // Nor delete the command server's policy consumer (it may delete the consumers it
    // creates itself).
    let policy = command_server::policy::CONSUMER_NAME;
    let deleted = js.delete_consumer_from_stream(policy, "SHOP_EVENTS").await;
    assert!(
        deleted.is_err(),
        "the query server's user deleted the policy consumer"
    );
    let stream = js.get_stream("SHOP_EVENTS").await.expect("stream info");
    stream
        .consumer_info(policy)
        .await
        .expect("the policy consumer is still there");
}

/// NATS log lines about refused operations other than the test's own (the forged publish,
/// the policy consumer's deletion): the servers must never need more than their users may
/// do.
fn assert_servers_never_refused(nats: &Nats) {
    let log = nats.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| line.to_lowercase().contains("violation"))
        .filter(|line| !line.contains("shop.events.customer.forged"))
        .filter(|line| !line.contains(command_server::policy::CONSUMER_NAME))
        .collect();
    assert!(
        refused.is_empty(),
        "servers refused by NATS:\n{}",
        refused.join("\n")
    );
    assert!(
        log.contains("Publish Violation"),
        "NATS logs violations (else the check above proves nothing):\n{log}"
    );
}

#[tokio::test]
async fn nats_credentials_files_authenticate_each_server_as_its_own_user() {
    let operator = NatsOperator::new();
    let nats = Nats::start_with_config(Some(&operator.server_config()));
    let creds = |user: &str| operator.user_creds(user, &nats_user_permissions(user));
    let (command_creds, query_creds) = (creds("command"), creds("query"));
    let flag =
        |path: &std::path::Path| vec!["--nats-creds".to_string(), path.display().to_string()];
    let command = Server::start(ServerKind::Command, &nats, &args(&flag(&command_creds))).await;
    let query = Server::start(ServerKind::Query, &nats, &args(&flag(&query_creds))).await;
    command
        .wait_health("shop.v1.Relay", ServingStatus::Serving, WAIT)
        .await;
    command_reaches_query(&command, &query).await;
    let intruder = async_nats::ConnectOptions::with_credentials_file(&query_creds)
        .await
        .expect("read creds");
    assert_publish_refused(intruder, &nats).await;
    let anonymous = async_nats::ConnectOptions::new().connect(nats.url()).await;
    assert!(
        anonymous.is_err(),
        "NATS accepted a client without credentials"
    );
    assert_servers_never_refused(&nats);
}
