//! Observability (README: Observability), black-box: Prometheus metrics scraped from both
//! servers move with the calls and agree with the status RPCs; freshness metadata on
//! every query answer; one trace from a command's server span across NATS to the query
//! server's apply span, received by a real OTLP/gRPC receiver.

use std::collections::BTreeSet;
use std::time::Duration;

use shop_tests::observability::{
    http_get, metrics_addr, try_http_get, ReceivedSpan, Scrape, SpanReceiver,
};
use shop_tests::{code, eventually, log_position, parked_reads, pb, req, Nats, Server, ServerKind};
use tonic::Code;

const METRICS: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];
const WAIT: Duration = Duration::from_secs(15);

fn with_traceparent<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        traceparent.parse().expect("ascii traceparent"),
    );
    request
}

fn handled<'a>(method: &'a str, code: &'a str) -> [(&'static str, &'a str); 2] {
    [("grpc_method", method), ("grpc_code", code)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_calls_and_agree_with_the_status_rpcs() {
    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &METRICS).await;
    let query = Server::start(ServerKind::Query, &nats, &METRICS).await;
    let (cm, qm) = (metrics_addr(&command).await, metrics_addr(&query).await);

    // Every metric README lists is there from the start, with its type.
    let first = Scrape::from(cm).await;
    for (name, kind) in [
        ("grpc_server_handled_total", "counter"),
        ("grpc_server_started_total", "counter"),
        ("grpc_server_handling_seconds", "histogram"),
        ("shop_log_position", "gauge"),
        ("shop_relay_published_position", "gauge"),
        ("shop_relay_lag_events", "gauge"),
        ("shop_group_commit_sync_seconds", "histogram"),
        ("shop_group_commit_commands", "histogram"),
        ("shop_commands_total", "counter"),
        ("shop_shed_requests_total", "counter"),
    ] {
        assert_eq!(
            first.types.get(name).map(String::as_str),
            Some(kind),
            "{name}"
        );
    }
    let first = Scrape::from(qm).await;
    for (name, kind) in [
        ("grpc_server_handled_total", "counter"),
        ("grpc_server_handling_seconds", "histogram"),
        ("shop_query_applied_position", "gauge"),
        ("shop_query_lag_events", "gauge"),
        ("shop_query_watchers", "gauge"),
        ("shop_shed_requests_total", "counter"),
    ] {
        assert_eq!(
            first.types.get(name).map(String::as_str),
            Some(kind),
            "{name}"
        );
    }
    // Zero series exist before the first call, so rates have a start.
    assert_eq!(
        first.value(
            "grpc_server_handled_total",
            &[("grpc_method", "GetOrder"), ("grpc_code", "OK")]
        ),
        Some(0.0)
    );

    // Commands: one accepted, one refused, one replayed.
    let mut c = command.commands().await;
    let mut register = req::register("m1", "m1@example.com");
    register.command_id = "metrics-1".into();
    let position = c
        .register_customer(register.clone())
        .await
        .expect("register")
        .into_inner()
        .position;
    let replayed = c.register_customer(register).await.expect("replay");
    assert!(replayed.metadata().contains_key("shop-replayed"));
    let refused = c
        .register_customer(req::register("m2", "not an email"))
        .await;
    assert_eq!(code(&refused), Code::InvalidArgument);

    let s = Scrape::from(cm).await;
    let method = "RegisterCustomer";
    assert_eq!(
        s.value("grpc_server_handled_total", &handled(method, "OK")),
        Some(2.0)
    );
    assert_eq!(
        s.value(
            "grpc_server_handled_total",
            &handled(method, "InvalidArgument")
        ),
        Some(1.0)
    );
    assert_eq!(
        s.value("grpc_server_started_total", &[("grpc_method", method)]),
        Some(3.0)
    );
    assert_eq!(
        s.value(
            "grpc_server_handling_seconds_count",
            &[("grpc_method", method)]
        ),
        Some(3.0)
    );
    assert_eq!(
        s.value(
            "grpc_server_handling_seconds_bucket",
            &[("grpc_method", method), ("le", "+Inf")]
        ),
        Some(3.0)
    );
    for (outcome, n) in [("OK", 1.0), ("Replayed", 1.0), ("InvalidArgument", 1.0)] {
        assert_eq!(
            s.value(
                "shop_commands_total",
                &[("command", method), ("outcome", outcome)]
            ),
            Some(n),
            "{outcome}"
        );
    }
    // The accepted command and its replay were answered through group commit; the
    // invalid one never reached the writer.
    assert_eq!(s.value("shop_group_commit_commands_sum", &[]), Some(2.0));
    assert!(s.value_or_zero("shop_group_commit_sync_seconds_count", &[]) >= 1.0);
    assert_eq!(s.value("shop_log_position", &[]), Some(position as f64));

    // The relay's gauges reach the log position and agree with GetLogStatus.
    let mut log = command.log_reader().await;
    eventually(WAIT, "relay published everything", || {
        let mut log = log.clone();
        async move {
            let scrape = Scrape::from(cm).await;
            let status = log
                .get_log_status(pb::GetLogStatusRequest {})
                .await
                .ok()?
                .into_inner();
            let published = scrape.value("shop_relay_published_position", &[])?;
            (published == position as f64
                && status.published_position == position
                && scrape.value("shop_relay_lag_events", &[]) == Some(0.0)
                && scrape.value("shop_log_position", &[]) == Some(status.log_position as f64))
            .then_some(())
        }
    })
    .await;
    assert_eq!(log_position(&mut log).await, position);

    // Queries: applied position and lag agree with GetStatus; codes are counted.
    let mut q = query.queries().await;
    let got = q
        .get_customer(pb::GetCustomerRequest {
            customer_id: "m1".into(),
            min_position: position,
            ..Default::default()
        })
        .await;
    assert_eq!(code(&got), Code::Ok);
    let missing = q
        .get_customer(pb::GetCustomerRequest {
            customer_id: "nobody".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(&missing), Code::NotFound);
    let s = Scrape::from(qm).await;
    assert_eq!(
        s.value("grpc_server_handled_total", &handled("GetCustomer", "OK")),
        Some(1.0)
    );
    assert_eq!(
        s.value(
            "grpc_server_handled_total",
            &handled("GetCustomer", "NotFound")
        ),
        Some(1.0)
    );
    assert!(s.value_or_zero("shop_query_applied_position", &[]) >= position as f64);
    let status = q
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let s = Scrape::from(qm).await;
    assert_eq!(
        s.value("shop_query_applied_position", &[]),
        Some(status.applied_position as f64)
    );
    assert_eq!(
        s.value("shop_query_lag_events", &[]),
        Some(status.lag as f64)
    );

    // An open watch is counted while it lasts.
    let mut watch = q
        .watch_customer(pb::WatchCustomerRequest {
            customer_id: "m1".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("first").expect("current view");
    assert_eq!(
        Scrape::from(qm).await.value("shop_query_watchers", &[]),
        Some(1.0)
    );
    drop(watch);
    eventually(WAIT, "the watcher gauge to drop", || async move {
        (Scrape::from(qm).await.value("shop_query_watchers", &[]) == Some(0.0)).then_some(())
    })
    .await;

    // Only /metrics is served.
    let (status, _, _) = http_get(cm, "/").await;
    assert_eq!(status, 404);

    // Idle and garbage connections beyond the limit (64) are closed, not queued: the
    // endpoint stays up and serves once they are gone.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(tokio::net::TcpStream::connect(cm).await.expect("connect"));
    }
    let mut garbage = tokio::net::TcpStream::connect(qm).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"\x00\x01 not http\r\n\r\n")
        .await
        .expect("write");
    drop(idle);
    drop(garbage);
    eventually(WAIT, "scrapes served again", || async move {
        let answer = try_http_get(cm, "/metrics").await;
        matches!(answer, Ok((200, _, _))).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shed_request_is_counted_once() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // No stream: nothing is ever applied, so requests for a position wait to their deadline.
    let mut query = Server::new(
        ServerKind::Query,
        &nats.url(),
        dir.path().join("q"),
        dir.path().to_path_buf(),
        &["--requests-per-connection-max", "2", METRICS[0], METRICS[1]],
    );
    query.spawn_until_listening();
    let qm = metrics_addr(&query).await;
    let channel = query.channel().await;
    let shed = parked_reads(&channel, 20, Duration::from_secs(2))
        .await
        .into_iter()
        .filter(|(code, _)| *code == Code::ResourceExhausted)
        .count() as f64;
    assert!(
        shed >= 1.0,
        "a limit of 2 under 20 concurrent requests shed nothing"
    );
    let s = Scrape::from(qm).await;
    assert_eq!(s.value("shop_shed_requests_total", &[]), Some(shed));
    assert_eq!(
        s.value(
            "grpc_server_handled_total",
            &handled("GetCustomer", "ResourceExhausted")
        ),
        Some(shed)
    );
}

/// The freshness headers of a response's metadata.
fn freshness(metadata: &tonic::metadata::MetadataMap) -> (u64, u64) {
    let read = |key: &str| -> u64 {
        metadata
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {metadata:?}"))
            .to_str()
            .expect("ascii")
            .parse()
            .expect("a number")
    };
    (read("shop-applied-position"), read("shop-lag-events"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_answer_carries_its_freshness() {
    let stack = shop_tests::Stack::start().await;
    let mut c = stack.command.commands().await;
    c.register_customer(req::register("f1", "f1@example.com"))
        .await
        .expect("register");
    let position = c
        .rename_customer(pb::RenameCustomerRequest {
            customer_id: "f1".into(),
            name: "Renamed".into(),
            ..Default::default()
        })
        .await
        .expect("rename")
        .into_inner()
        .position;
    let mut q = stack.query.queries().await;

    let got = q
        .get_customer(pb::GetCustomerRequest {
            customer_id: "f1".into(),
            min_position: position,
            ..Default::default()
        })
        .await
        .expect("get");
    let (applied, _lag) = freshness(got.metadata());
    assert!(
        applied >= got.get_ref().position && applied >= position,
        "applied {applied} behind the answer (position {})",
        got.get_ref().position
    );

    // Refusals carry it too.
    let missing = q
        .get_customer(pb::GetCustomerRequest {
            customer_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .expect_err("not found");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(freshness(missing.metadata()).0 >= position);
    let bad = q
        .get_order(pb::GetOrderRequest {
            order_id: "not an id!".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    freshness(bad.metadata());

    // GetStatus: never behind its own body.
    let status = q.get_status(pb::GetStatusRequest {}).await.expect("status");
    let (applied, lag) = freshness(status.metadata());
    assert!(applied >= status.get_ref().applied_position);
    assert_eq!(
        lag,
        status
            .get_ref()
            .stream_last_sequence
            .saturating_sub(applied)
    );

    // Lists, history and streams (on the response headers).
    let list = q
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .expect("list");
    freshness(list.metadata());
    let history = q
        .get_history(pb::GetHistoryRequest {
            stream_id: "customer-f1".into(),
            ..Default::default()
        })
        .await
        .expect("history");
    assert!(
        freshness(history.metadata()).0
            >= history.get_ref().events.last().map_or(0, |e| e.position)
    );
    let watch = q
        .watch_customer(pb::WatchCustomerRequest {
            customer_id: "f1".into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    assert!(freshness(watch.metadata()).0 >= position);
}

fn find<'a>(
    spans: &'a [ReceivedSpan],
    service: &str,
    what: impl Fn(&ReceivedSpan) -> bool,
) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|s| s.service == service && what(s))
}

/// The command server's span for `method` in `trace_id`, and the query server's apply
/// spans that are its children.
async fn command_and_apply_spans(
    receiver: &SpanReceiver,
    trace_id: &str,
    method: &str,
    applies: usize,
) -> (ReceivedSpan, Vec<ReceivedSpan>) {
    eventually(
        WAIT,
        &format!("spans of {method} in trace {trace_id}"),
        || {
            let spans = receiver.spans();
            let found = find(&spans, "command-server", |s| {
                s.trace_id == trace_id
                    && s.attributes.get("rpc.method").map(String::as_str)
                        == Some(&format!("shop.v1.CommandService/{method}"))
            })
            .map(|command| {
                let children: Vec<ReceivedSpan> = spans
                    .iter()
                    .filter(|s| {
                        s.service == "query-server"
                            && s.trace_id == trace_id
                            && s.parent_span_id == command.span_id
                    })
                    .cloned()
                    .collect();
                (command.clone(), children)
            });
            async move { found.filter(|(_, children)| children.len() >= applies) }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_command_across_nats_to_the_view_and_the_policy() {
    let receiver = SpanReceiver::start().await;
    let otlp = ["--otlp-endpoint", receiver.endpoint.as_str()];
    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &otlp).await;
    let query = Server::start(ServerKind::Query, &nats, &otlp).await;
    let mut c = command.commands().await;

    // The caller's trace: the server span is its child; each event's apply span is the
    // server span's child.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let place = c
        .register_customer(with_traceparent(
            req::register("t1", "t1@example.com"),
            &format!("00-{trace}-{caller_span}-01"),
        ))
        .await
        .expect("register");
    assert_eq!(place.get_ref().event_count, 1);
    let (server, applies) = command_and_apply_spans(&receiver, trace, "RegisterCustomer", 1).await;
    assert_eq!(server.parent_span_id, caller_span);
    assert_eq!(
        server.attributes.get("rpc.system.name").map(String::as_str),
        Some("grpc")
    );
    assert_eq!(
        server
            .attributes
            .get("rpc.response.status_code")
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(applies[0].name, "apply event to views");

    // No traceparent: a new trace, still followed across NATS (PlaceOrder: two events).
    c.create_product(req::product("tp", 100, 10))
        .await
        .expect("product");
    c.place_order(req::order("to1", "t1", &[("tp", 1)]))
        .await
        .expect("order");
    let spans = eventually(WAIT, "the PlaceOrder server span", || {
        let spans = receiver.spans();
        async move {
            find(&spans, "command-server", |s| {
                s.attributes.get("rpc.method").map(String::as_str)
                    == Some("shop.v1.CommandService/PlaceOrder")
            })
            .cloned()
        }
    })
    .await;
    assert_eq!(spans.parent_span_id, "", "a new trace starts at the server");
    command_and_apply_spans(&receiver, &spans.trace_id, "PlaceOrder", 2).await;

    // The policy's cancel continues the trace of the DeleteCustomer that caused it.
    let delete_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    c.delete_customer(with_traceparent(
        pb::DeleteCustomerRequest {
            customer_id: "t1".into(),
            ..Default::default()
        },
        &format!("00-{delete_trace}-{caller_span}-01"),
    ))
    .await
    .expect("delete");
    let policy = eventually(WAIT, "the policy's span in the delete's trace", || {
        let spans = receiver.spans();
        async move {
            find(&spans, "command-server", |s| {
                s.trace_id == delete_trace && s.name.contains("policy")
            })
            .cloned()
        }
    })
    .await;
    // OrderCancelled and StockReleased are applied as children of the policy's span.
    eventually(
        WAIT,
        "the cancel's events applied in the delete's trace",
        || {
            let spans = receiver.spans();
            let n = spans
                .iter()
                .filter(|s| {
                    s.service == "query-server"
                        && s.trace_id == delete_trace
                        && s.parent_span_id == policy.span_id
                })
                .count();
            async move { (n >= 2).then_some(()) }
        },
    )
    .await;

    // A caller that says "not sampled" is honoured: nothing of its trace is exported.
    let quiet = "6bf92f3577b34da6a3ce929d0e0e4738";
    c.register_customer(with_traceparent(
        req::register("t2", "t2@example.com"),
        &format!("00-{quiet}-{caller_span}-00"),
    ))
    .await
    .expect("register");
    let marker = "7bf92f3577b34da6a3ce929d0e0e4739";
    c.register_customer(with_traceparent(
        req::register("t3", "t3@example.com"),
        &format!("00-{marker}-{caller_span}-01"),
    ))
    .await
    .expect("register");
    // Once the later, sampled command's spans are in, the earlier one's would be too.
    command_and_apply_spans(&receiver, marker, "RegisterCustomer", 1).await;
    let traces: BTreeSet<String> = receiver.spans().into_iter().map(|s| s.trace_id).collect();
    assert!(!traces.contains(quiet), "an unsampled trace was exported");
    drop(query);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_trace_of_their_request_without_an_exporter() {
    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &["--log-format", "json"]).await;
    let mut c = command.commands().await;
    c.register_customer(req::register("j1", "j1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("jp", 100, 10))
        .await
        .expect("product");
    c.place_order(req::order("jo1", "j1", &[("jp", 1)]))
        .await
        .expect("order");
    let trace = "8bf92f3577b34da6a3ce929d0e0e4730";
    c.delete_customer(with_traceparent(
        pb::DeleteCustomerRequest {
            customer_id: "j1".into(),
            ..Default::default()
        },
        &format!("00-{trace}-00f067aa0ba902b7-01"),
    ))
    .await
    .expect("delete");
    // The policy's cancel logs inside its span, which continues the delete's trace.
    let line = eventually(WAIT, "the policy's log line", || {
        let line = command
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "order of deleted customer cancelled");
        async move { line }
    })
    .await;
    assert_eq!(line["span"]["trace_id"], trace, "{line}");
    assert_eq!(
        line["span"]["span_id"].as_str().map(str::len),
        Some(16),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_parse_and_use_only_served_metrics() {
    use shop_tests::observability::{metrics_in_promql, promtool};
    let root = shop_tests::workspace_root().join("monitoring");
    // The rules load, and their unit tests (alerts fire when they should) pass.
    promtool(&["check", "rules", "monitoring/alerts.yml"], "");
    promtool(&["test", "rules", "monitoring/alerts_test.yml"], "");
    promtool(&["check", "config", "monitoring/prometheus.yml"], "");

    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &METRICS).await;
    let query = Server::start(ServerKind::Query, &nats, &METRICS).await;
    let mut served = BTreeSet::new();
    for server in [&command, &query] {
        let addr = metrics_addr(server).await;
        let (_, _, body) = http_get(addr, "/metrics").await;
        // Prometheus' own linter has nothing to say about the exposition.
        let lint = promtool(&["check", "metrics"], &body);
        assert!(lint.trim().is_empty(), "{lint}");
        served.extend(Scrape::parse(&body).expect("parse").names());
    }

    let mut used = BTreeSet::new();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana-dashboard.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            used.extend(metrics_in_promql(target["expr"].as_str().expect("expr")));
        }
    }
    let rules = std::fs::read_to_string(root.join("alerts.yml")).expect("rules");
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            used.extend(metrics_in_promql(expr));
        }
    }
    let missing: Vec<&String> = used.difference(&served).collect();
    assert!(missing.is_empty(), "used but not served: {missing:?}");
    // What the dashboard must show (the list), each by its metric.
    for needed in [
        "shop_commands_total",
        "grpc_server_handling_seconds_bucket",
        "shop_group_commit_sync_seconds_bucket",
        "shop_group_commit_commands_sum",
        "shop_relay_lag_events",
        "shop_query_lag_events",
        "shop_query_applied_position",
        "shop_query_watchers",
        "shop_shed_requests_total",
        "shop_serving",
    ] {
        assert!(used.contains(needed), "nothing shows {needed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_ratio_of_zero_exports_only_traces_the_caller_sampled() {
    let receiver = SpanReceiver::start().await;
    let args = [
        "--otlp-endpoint",
        receiver.endpoint.as_str(),
        "--otlp-sample-ratio",
        "0",
    ];
    let nats = Nats::start();
    let command = Server::start(ServerKind::Command, &nats, &args).await;
    let _query = Server::start(ServerKind::Query, &nats, &args).await;
    let mut c = command.commands().await;
    c.create_product(req::product("zp", 100, 10))
        .await
        .expect("product");
    // No traceparent: a new trace, sampled at ratio 0, so never exported.
    for _ in 0..20 {
        c.restock_product(pb::RestockProductRequest {
            sku: "zp".into(),
            quantity: 1,
            ..Default::default()
        })
        .await
        .expect("restock");
    }
    // A caller's sampled trace is exported whatever the ratio, across NATS too.
    let trace = "9bf92f3577b34da6a3ce929d0e0e4731";
    c.register_customer(with_traceparent(
        req::register("z1", "z1@example.com"),
        &format!("00-{trace}-00f067aa0ba902b7-01"),
    ))
    .await
    .expect("register");
    command_and_apply_spans(&receiver, trace, "RegisterCustomer", 1).await;
    let spans = receiver.spans();
    assert!(
        spans.iter().all(|s| s.trace_id == trace),
        "only the caller's sampled trace was exported: {spans:?}"
    );
}
