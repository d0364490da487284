//! Stage `observability`: what metrics and traces cost on the command path. The same
//! mixed command workload runs at the reference concurrency against a fresh stack per
//! run, with the configurations alternating round by round, in reverse order every other
//! round (so drift of the machine and a place in the round spread over all of them):
//!
//! - `off`: no metrics endpoint, no exporter (the default);
//! - `metrics`: `--metrics-listen` on both servers, each scraped once a second (15× the
//!   usual Prometheus interval);
//! - `metrics+traces 1%`: the same plus `--otlp-endpoint` (a real OTLP receiver in this
//!   process) with `--otlp-sample-ratio 0.01`;
//! - `metrics+traces 100%`: every trace exported;
//! - `baseline` (with `--baseline-bin-dir`): older server binaries, for a before/after.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shop_tests::observability::{http_get, metrics_addr, SpanReceiver};
use shop_tests::{Kind, Nats, Server};

use crate::stats::RunSummary;
use crate::system::CpuMeter;
use crate::workload::{self, Catalog, Load};

/// What the gRPC layers cost per request, measured in-process on a no-op service.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LayerCost {
    /// The bare no-op service, the reference.
    pub bare_ns: f64,
    /// With the metrics layer (started/handled counters, handling histogram).
    pub metrics_ns: f64,
    /// With the per-connection shedding layer.
    pub shed_ns: f64,
    /// With the server-span layer, no exporter, INFO logging on (as the servers run).
    pub trace_ns: f64,
}

/// Times `requests` calls through `layer` over a no-op service answering OK in the
/// headers; nanoseconds per call.
async fn time_layer<L>(layer: L, requests: u32) -> f64
where
    L: tower::Layer<
        tower::util::ServiceFn<
            fn(
                http::Request<()>,
            ) -> std::future::Ready<
                Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            >,
        >,
    >,
    L::Service: tower::Service<http::Request<()>>,
{
    use tower::{Service, ServiceExt};
    fn ok(
        _: http::Request<()>,
    ) -> std::future::Ready<Result<http::Response<tonic::body::Body>, std::convert::Infallible>>
    {
        let mut response = http::Response::new(tonic::body::Body::default());
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        std::future::ready(Ok(response))
    }
    let mut service = layer.layer(tower::service_fn(ok as fn(_) -> _));
    let peer = tonic::transport::server::TcpConnectInfo {
        local_addr: None,
        remote_addr: "127.0.0.1:9".parse().ok(),
    };
    let started = std::time::Instant::now();
    for _ in 0..requests {
        let mut request = http::Request::new(());
        *request.uri_mut() = http::Uri::from_static("/shop.v1.CommandService/PlaceOrder");
        request.extensions_mut().insert(peer.clone());
        if let Ok(ready) = service.ready().await {
            let _response = ready.call(request).await;
        }
    }
    started.elapsed().as_nanos() as f64 / f64::from(requests)
}

/// Measures [`LayerCost`], best of three rounds each.
pub fn layer_costs(requests: u32) -> LayerCost {
    use shop_shared::metrics::{GrpcMetrics, Registry, ShedLayer};
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(_) => return LayerCost::default(),
    };
    // The servers log at INFO, so their spans are enabled; here too, into a sink.
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let best = |f: &dyn Fn() -> f64| (0..3).map(|_| f()).fold(f64::MAX, f64::min);
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::register(&mut registry, &["shop.v1.CommandService"]);
        let (shed, _) = ShedLayer::register(&mut registry, 1024);
        LayerCost {
            bare_ns: best(&|| {
                runtime.block_on(time_layer(tower::layer::util::Identity::new(), requests))
            }),
            metrics_ns: best(&|| runtime.block_on(time_layer(metrics.layer(), requests))),
            shed_ns: best(&|| runtime.block_on(time_layer(shed.clone(), requests))),
            trace_ns: best(&|| {
                runtime.block_on(time_layer(shop_shared::telemetry::TraceLayer, requests))
            }),
        }
    })
}

/// One run of one configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObservabilityPoint {
    pub config: String,
    pub round: usize,
    pub commands: RunSummary,
    /// Cores used by each server during the run.
    pub command_server_cpu: f64,
    pub query_server_cpu: f64,
    /// Spans the receiver got during the run.
    pub spans_exported: usize,
    /// The total rate the run was paced at, if it was.
    pub paced_rate: Option<f64>,
}

/// What the stage runs.
pub struct Plan {
    pub load: Load,
    pub rounds: usize,
    pub catalog: Catalog,
    pub baseline_bin_dir: Option<PathBuf>,
    /// Configurations to run, by name (all when empty).
    pub configs: Vec<String>,
}

struct Config {
    name: &'static str,
    metrics: bool,
    sample_ratio: Option<&'static str>,
    baseline: bool,
}

const CONFIGS: [Config; 4] = [
    Config {
        name: "off",
        metrics: false,
        sample_ratio: None,
        baseline: false,
    },
    Config {
        name: "metrics",
        metrics: true,
        sample_ratio: None,
        baseline: false,
    },
    Config {
        name: "metrics+traces 1%",
        metrics: true,
        sample_ratio: Some("0.01"),
        baseline: false,
    },
    Config {
        name: "metrics+traces 100%",
        metrics: true,
        sample_ratio: Some("1"),
        baseline: false,
    },
];

const BASELINE: Config = Config {
    name: "baseline",
    metrics: false,
    sample_ratio: None,
    baseline: true,
};

/// Runs every configuration `plan.rounds` times, alternating.
pub async fn run(plan: &Plan) -> anyhow::Result<Vec<ObservabilityPoint>> {
    let receiver = SpanReceiver::start().await;
    let mut configs: Vec<&Config> = CONFIGS.iter().collect();
    if plan.baseline_bin_dir.is_some() {
        configs.insert(0, &BASELINE);
    }
    if !plan.configs.is_empty() {
        configs.retain(|c| plan.configs.iter().any(|name| name == c.name));
        anyhow::ensure!(
            !configs.is_empty(),
            "no observability config named {:?}",
            plan.configs
        );
    }
    let mut points = Vec::new();
    for round in 0..plan.rounds {
        // ABBA order: a configuration's place in the round (e.g. first after the
        // previous round's heaviest) must not favour it.
        let order: Vec<&&Config> = if round % 2 == 0 {
            configs.iter().collect()
        } else {
            configs.iter().rev().collect()
        };
        for config in order {
            let point = run_one(plan, config, round, &receiver).await?;
            crate::say(format!(
                "observability round {round} {}: {:.0} commands/s, p50 {:.2} ms, p99 {:.2} ms, command-server {:.2} cores, {} spans",
                config.name,
                point.commands.per_second,
                point.commands.latency.p50_ms,
                point.commands.latency.p99_ms,
                point.command_server_cpu,
                point.spans_exported
            ));
            points.push(point);
        }
    }
    Ok(points)
}

async fn start(
    kind: Kind,
    nats: &Nats,
    args: &[&str],
    dir: &Path,
    bin_dir: Option<&PathBuf>,
) -> Server {
    let mut server = Server::new(
        kind,
        &nats.url(),
        dir.join(kind.binary()).join("data"),
        dir.join(kind.binary()),
        args,
    );
    if let Some(bin_dir) = bin_dir {
        server.set_bin_dir(bin_dir.clone());
    }
    let _ = std::fs::create_dir_all(dir.join(kind.binary()));
    server.spawn_until_listening();
    server.wait_serving().await;
    server
}

async fn run_one(
    plan: &Plan,
    config: &Config,
    round: usize,
    receiver: &SpanReceiver,
) -> anyhow::Result<ObservabilityPoint> {
    let dir = tempfile::tempdir()?;
    let nats = Nats::start();
    let mut args: Vec<&str> = Vec::new();
    if config.metrics {
        args.extend(["--metrics-listen", "127.0.0.1:0"]);
    }
    if let Some(ratio) = config.sample_ratio {
        args.extend([
            "--otlp-endpoint",
            receiver.endpoint.as_str(),
            "--otlp-sample-ratio",
            ratio,
        ]);
    }
    let bin_dir = config
        .baseline
        .then_some(plan.baseline_bin_dir.as_ref())
        .flatten();
    let command = start(Kind::Command, &nats, &args, dir.path(), bin_dir).await;
    let query = start(Kind::Query, &nats, &args, dir.path(), bin_dir).await;
    workload::setup(&command.endpoint(), plan.catalog).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let scraper = if config.metrics {
        let addrs = [metrics_addr(&command).await, metrics_addr(&query).await];
        let stop = stop.clone();
        Some(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for addr in addrs {
                    let _ = http_get(addr, "/metrics").await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
    } else {
        None
    };
    let spans_before = receiver.spans().len();
    let meter = CpuMeter::start(&[
        ("command-server", command.pid()),
        ("query-server", query.pid()),
    ]);
    let run = workload::run_commands(
        &command.endpoint(),
        &format!("obs{round}"),
        plan.catalog,
        &plan.load,
        None,
    )
    .await?;
    let cpu = meter.stop();
    stop.store(true, Ordering::Relaxed);
    if let Some(scraper) = scraper {
        let _ = scraper.await;
    }
    let cores = |name: &str| cpu.iter().find(|(n, _)| n == name).map_or(0.0, |(_, c)| *c);
    Ok(ObservabilityPoint {
        config: config.name.to_string(),
        round,
        command_server_cpu: cores("command-server"),
        query_server_cpu: cores("query-server"),
        spans_exported: receiver.spans().len().saturating_sub(spans_before),
        paced_rate: plan.load.rate,
        commands: run.summary,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The report's table: per configuration, the median of its runs and each run's rate;
/// then the per-request cost of each layer.
pub fn markdown(points: &[ObservabilityPoint], layers: &LayerCost, paced: Option<f64>) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let Some(first) = points.first() else {
        return md;
    };
    let _ = writeln!(
        md,
        "### Observability cost\n\nThe mixed command workload at {} clients ({} connections, {:.0} s per run{}), a fresh stack per run, configurations alternating round by round; medians over the rounds (`metrics`: both servers scraped every second).\n\n| config | commands/s (median) | each run | vs off | p50 ms | p99 ms | command-server cores | command-server CPU µs per command | query-server cores | spans exported per run |\n|---|---|---|---|---|---|---|---|---|---|",
        first.commands.concurrency,
        first.commands.connections,
        first.commands.seconds,
        paced
            .map(|rate| format!(", paced at {rate:.0} commands/s"))
            .unwrap_or_default()
    );
    let mut names: Vec<&str> = Vec::new();
    for p in points {
        if !names.contains(&p.config.as_str()) {
            names.push(&p.config);
        }
    }
    fn of<'a>(
        points: &'a [ObservabilityPoint],
        name: &'a str,
    ) -> impl Iterator<Item = &'a ObservabilityPoint> + 'a {
        points.iter().filter(move |p| p.config == name)
    }
    let off = median(of(points, "off").map(|p| p.commands.per_second).collect());
    for name in names {
        let rate = median(of(points, name).map(|p| p.commands.per_second).collect());
        let runs = of(points, name)
            .map(|p| format!("{:.0}", p.commands.per_second))
            .collect::<Vec<_>>()
            .join(" / ");
        let _ = writeln!(
            md,
            "| {name} | {rate:.0} | {runs} | {:+.1}% | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} |",
            100.0 * (rate / off.max(1e-9) - 1.0),
            median(
                of(points, name)
                    .map(|p| p.commands.latency.p50_ms)
                    .collect()
            ),
            median(
                of(points, name)
                    .map(|p| p.commands.latency.p99_ms)
                    .collect()
            ),
            median(of(points, name).map(|p| p.command_server_cpu).collect()),
            median(
                of(points, name)
                    .map(|p| 1e6 * p.command_server_cpu / p.commands.per_second.max(1e-9))
                    .collect()
            ),
            median(of(points, name).map(|p| p.query_server_cpu).collect()),
            median(of(points, name).map(|p| p.spans_exported as f64).collect()),
        );
    }
    let _ = writeln!(
        md,
        "\nPer request, in-process on a no-op service (best of 3 × 200k calls): bare {:.0} ns; metrics layer +{:.0} ns; shedding layer +{:.0} ns; server-span layer (no exporter, INFO on) +{:.0} ns.\n",
        layers.bare_ns,
        layers.metrics_ns - layers.bare_ns,
        layers.shed_ns - layers.bare_ns,
        layers.trace_ns - layers.bare_ns,
    );
    md
}
