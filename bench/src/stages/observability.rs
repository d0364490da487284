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
//!
//! Stage `security` runs the same way over what security (README: Running securely) adds to each request:
//! `plaintext` (the default), `tls`, `tls+tokens` (a bearer token from the tokens file),
//! `mtls+tokens` (and a client certificate), `tls+jwt` (an EdDSA JWT verified per request).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shop_tests::observability::{http_get, metrics_addr, SpanReceiver};
use shop_tests::security::{write_tokens, JwtKeys, Pki};
use shop_tests::{Nats, Server, ServerKind};

use crate::stats::RunSummary;
use crate::system::CpuMeter;
use crate::workload::{self, Catalog, Load, Target};

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
    /// With the authentication layer, authentication off (the default).
    pub auth_off_ns: f64,
    /// With the authentication layer checking a bearer token against a tokens file.
    pub auth_token_ns: f64,
}

/// Times `requests` calls through `layer` over a no-op service answering OK in the
/// headers, each request with `authorization` if given; nanoseconds per call.
async fn time_layer<L>(layer: L, requests: u32, authorization: Option<&http::HeaderValue>) -> f64
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
        if let Some(value) = authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
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
        let (shed, _) = ShedLayer::register(
            &mut registry,
            shop_shared::metrics::ShedLimits {
                per_connection: 1024,
                total: 1024,
            },
        );
        let tokens = tempfile::NamedTempFile::new().ok();
        let authenticator = tokens.as_ref().and_then(|file| {
            write_tokens(file.path(), &[("writer", WRITER_TOKEN, "bench")], &[]);
            shop_shared::auth::Authenticator::load(Some(file.path()), None)
                .ok()
                .flatten()
        });
        let bearer = http::HeaderValue::from_static("Bearer bench-writer-token");
        LayerCost {
            bare_ns: best(&|| {
                runtime.block_on(time_layer(
                    tower::layer::util::Identity::new(),
                    requests,
                    None,
                ))
            }),
            metrics_ns: best(&|| runtime.block_on(time_layer(metrics.layer(), requests, None))),
            shed_ns: best(&|| runtime.block_on(time_layer(shed.clone(), requests, None))),
            trace_ns: best(&|| {
                runtime.block_on(time_layer(
                    shop_shared::telemetry::TraceLayer,
                    requests,
                    None,
                ))
            }),
            auth_off_ns: best(&|| {
                runtime.block_on(time_layer(
                    shop_shared::auth::AuthLayer::new(None),
                    requests,
                    None,
                ))
            }),
            auth_token_ns: best(&|| {
                runtime.block_on(time_layer(
                    shop_shared::auth::AuthLayer::new(authenticator.clone()),
                    requests,
                    Some(&bearer),
                ))
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
    transport: Transport,
    auth: Auth,
}

/// How clients reach the servers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Plain,
    Tls,
    Mtls,
}

/// What clients authenticate with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    None,
    Token,
    Jwt,
}

/// Which set of configurations a stage compares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Observability,
    Security,
}

impl Stage {
    fn configs(self) -> &'static [Config] {
        match self {
            Stage::Observability => &CONFIGS,
            Stage::Security => &SECURITY_CONFIGS,
        }
    }

    /// The configuration the others are compared with.
    fn reference(self) -> &'static str {
        match self {
            Stage::Observability => "off",
            Stage::Security => "plaintext",
        }
    }
}

const fn plain(name: &'static str, metrics: bool, sample_ratio: Option<&'static str>) -> Config {
    Config {
        name,
        metrics,
        sample_ratio,
        baseline: false,
        transport: Transport::Plain,
        auth: Auth::None,
    }
}

const fn secure(name: &'static str, transport: Transport, auth: Auth) -> Config {
    Config {
        name,
        metrics: false,
        sample_ratio: None,
        baseline: false,
        transport,
        auth,
    }
}

const SECURITY_CONFIGS: [Config; 5] = [
    secure("plaintext", Transport::Plain, Auth::None),
    secure("tls", Transport::Tls, Auth::None),
    secure("tls+tokens", Transport::Tls, Auth::Token),
    secure("mtls+tokens", Transport::Mtls, Auth::Token),
    secure("tls+jwt", Transport::Tls, Auth::Jwt),
];

/// The bench's credentials: a PKI, a tokens file with the writer token, a JWT key.
struct Credentials {
    pki: Pki,
    tokens: PathBuf,
    jwt: JwtKeys,
}

const WRITER_TOKEN: &str = "bench-writer-token";

impl Credentials {
    fn new() -> Credentials {
        let pki = Pki::new();
        let tokens = pki.path("tokens");
        write_tokens(&tokens, &[("writer", WRITER_TOKEN, "bench")], &[]);
        Credentials {
            pki,
            tokens,
            jwt: JwtKeys::ed25519(),
        }
    }

    /// The server flags of `config`.
    fn server_args(&self, config: &Config) -> Vec<String> {
        let mut args = match config.transport {
            Transport::Plain => Vec::new(),
            Transport::Tls => self.pki.server_args(false),
            Transport::Mtls => self.pki.server_args(true),
        };
        match config.auth {
            Auth::None => {}
            Auth::Token => args.extend(["--auth-tokens".into(), self.tokens.display().to_string()]),
            Auth::Jwt => args.extend([
                "--auth-jwt-key".into(),
                self.jwt.public_key_path.display().to_string(),
            ]),
        }
        args
    }

    /// How the bench's clients reach `server` under `config`.
    fn target(&self, config: &Config, server: &Server) -> Target {
        let tls = match config.transport {
            Transport::Plain => None,
            Transport::Tls => Some(self.pki.client_tls(None)),
            Transport::Mtls => Some(self.pki.client_tls(Some(self.pki.client_identity("bench")))),
        };
        let token = match config.auth {
            Auth::None => None,
            Auth::Token => Some(WRITER_TOKEN.to_string()),
            Auth::Jwt => Some(self.jwt.sign(&JwtKeys::claims("bench", &["writer"], 3600))),
        };
        Target {
            url: server.endpoint(),
            tls,
            token,
        }
    }
}

const CONFIGS: [Config; 4] = [
    plain("off", false, None),
    plain("metrics", true, None),
    plain("metrics+traces 1%", true, Some("0.01")),
    plain("metrics+traces 100%", true, Some("1")),
];

const BASELINE: Config = Config {
    baseline: true,
    ..plain("baseline", false, None)
};

/// Runs every configuration of `stage` `plan.rounds` times, alternating.
pub async fn run(plan: &Plan, stage: Stage) -> anyhow::Result<Vec<ObservabilityPoint>> {
    let receiver = SpanReceiver::start().await;
    let credentials = Credentials::new();
    let mut configs: Vec<&Config> = stage.configs().iter().collect();
    if plan.baseline_bin_dir.is_some() {
        configs.insert(0, &BASELINE);
    }
    if !plan.configs.is_empty() {
        configs.retain(|c| plan.configs.iter().any(|name| name == c.name));
        anyhow::ensure!(
            !configs.is_empty(),
            "no {} config named {:?}",
            stage.reference(),
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
            let point = run_one(plan, config, round, &receiver, &credentials).await?;
            crate::say(format!(
                "{} round {round} {}: {:.0} commands/s, p50 {:.2} ms, p99 {:.2} ms, command-server {:.2} cores, {} spans",
                match stage {
                    Stage::Observability => "observability",
                    Stage::Security => "security",
                },
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
    kind: ServerKind,
    nats: &Nats,
    args: &[&str],
    dir: &Path,
    bin_dir: Option<&PathBuf>,
    tls: Option<tonic::transport::ClientTlsConfig>,
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
    server.set_client_tls(tls);
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
    credentials: &Credentials,
) -> anyhow::Result<ObservabilityPoint> {
    let dir = tempfile::tempdir()?;
    let nats = Nats::start();
    let security_args = credentials.server_args(config);
    let mut args: Vec<&str> = security_args.iter().map(String::as_str).collect();
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
    // The harness's health checks go through the same TLS as the clients.
    let harness_tls = (config.transport != Transport::Plain).then(|| {
        credentials
            .pki
            .client_tls(Some(credentials.pki.client_identity("harness")))
    });
    let command = start(
        ServerKind::Command,
        &nats,
        &args,
        dir.path(),
        bin_dir,
        harness_tls.clone(),
    )
    .await;
    let query = start(
        ServerKind::Query,
        &nats,
        &args,
        dir.path(),
        bin_dir,
        harness_tls,
    )
    .await;
    let target = credentials.target(config, &command);
    workload::setup(&target, plan.catalog).await?;

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
        &target,
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
pub fn markdown(
    stage: Stage,
    points: &[ObservabilityPoint],
    layers: &LayerCost,
    paced: Option<f64>,
) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let Some(first) = points.first() else {
        return md;
    };
    let _ = writeln!(
        md,
        "### {} cost\n\nThe mixed command workload at {} clients ({} connections, {:.0} s per run{}), a fresh stack per run, configurations alternating round by round; medians over the rounds{}.\n\n| config | commands/s (median) | each run | vs {} | p50 ms | p99 ms | command-server cores | command-server CPU µs per command | query-server cores | spans exported per run |\n|---|---|---|---|---|---|---|---|---|---|",
        match stage {
            Stage::Observability => "Observability",
            Stage::Security => "Security",
        },
        first.commands.concurrency,
        first.commands.connections,
        first.commands.seconds,
        paced
            .map(|rate| format!(", paced at {rate:.0} commands/s"))
            .unwrap_or_default(),
        match stage {
            Stage::Observability => " (`metrics`: both servers scraped every second)",
            Stage::Security => " (both servers run the configuration; the clients send every command with its credentials; a connection's TLS handshake happens once, before the run)",
        },
        stage.reference(),
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
    let off = median(
        of(points, stage.reference())
            .map(|p| p.commands.per_second)
            .collect(),
    );
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
    if stage == Stage::Security {
        let _ = writeln!(
            md,
            "\nPer request, in-process on a no-op service (best of 3 × 200k calls): authentication layer, authentication off +{:.0} ns; checking a bearer token against the tokens file +{:.0} ns.\n",
            layers.auth_off_ns - layers.bare_ns,
            layers.auth_token_ns - layers.bare_ns,
        );
        return md;
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
