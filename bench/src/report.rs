//! The benchmark's output: every figure as JSON, a markdown report with each ratio next
//! to its ceiling, and two SVG charts (throughput over time, latency CDF).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::ceilings::Ceiling;
use crate::stats::{Latency, RunSummary};

/// One sample of the pipeline's progress.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LagSample {
    pub t_s: f64,
    pub log_position: u64,
    pub published: u64,
    pub applied: u64,
}

impl LagSample {
    pub fn query_lag(&self) -> u64 {
        self.log_position.saturating_sub(self.applied)
    }
}

/// The machine and the versions of what ran.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub disk: String,
    pub kernel: String,
    pub rustc: String,
    pub nats_server: String,
    pub crates: Vec<(String, String)>,
    pub profile: String,
}

/// One point of the command sweep.
#[derive(Debug, Clone, Serialize)]
pub struct CommandPoint {
    pub commands: RunSummary,
    /// Succeeded per kind: place, pay, ship, register, restock, cancel.
    pub kinds: [u64; 6],
    pub events_per_command: f64,
    pub echo: RunSummary,
    pub ratio_to_echo: f64,
    pub sled_ceiling: Ceiling,
    pub visibility: Latency,
    pub max_query_lag: u64,
    pub max_relay_lag: u64,
    /// Time for the query server to apply everything once the load stopped.
    pub drain_s: f64,
    /// Cores used by each process during the run.
    pub cpu: Vec<(String, f64)>,
    /// The command server's group commits during the run.
    pub syncs: Syncs,
    pub lag: Vec<LagSample>,
}

/// Group commit as the command server reports it (last ≤ 4096 syncs).
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Syncs {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub commands_per_sync: f64,
}

/// The paced run at half the best throughput.
#[derive(Debug, Clone, Serialize)]
pub struct HalfLoad {
    pub target_rate: f64,
    pub syncs: Syncs,
    pub commands: RunSummary,
    pub visibility: Latency,
    pub max_query_lag: u64,
}

/// One point of the query sweep.
#[derive(Debug, Clone, Serialize)]
pub struct QueryPoint {
    pub get_order: RunSummary,
    pub list_orders: RunSummary,
    pub echo: RunSummary,
    pub ratio_to_echo: f64,
}

/// The same paced load without and with idle watchers open.
#[derive(Debug, Clone, Serialize)]
pub struct Watchers {
    pub watchers: usize,
    pub rate: f64,
    pub without: WatcherRun,
    pub with: WatcherRun,
}

/// One run of the watcher comparison.
#[derive(Debug, Clone, Serialize)]
pub struct WatcherRun {
    pub events_per_second: f64,
    /// Query-server CPU per thousand events applied, in core-milliseconds.
    pub query_cpu_ms_per_1k_events: f64,
    pub visibility: Latency,
}

/// A pipeline stage draining a backlog.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub events: u64,
    pub seconds: f64,
    pub per_second: f64,
}

/// Command rate, memory and start-up at a given log size.
#[derive(Debug, Clone, Serialize)]
pub struct GrowthPoint {
    pub events_in_log: u64,
    pub commands_per_second: f64,
    pub ratio_to_empty: f64,
    pub command_server_rss_mb: f64,
    pub query_server_rss_mb: f64,
    /// First start after the log grew: sled scans everything written since its last open.
    pub command_server_start_s: f64,
    pub query_server_start_s: f64,
    /// The start right after that one: sled wrote its page-table snapshot at the first.
    pub command_server_restart_s: f64,
    pub query_server_restart_s: f64,
    pub command_data_mb: f64,
    pub query_data_mb: f64,
}

/// A performance target and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub id: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Results {
    pub started_at: String,
    pub mode: String,
    pub command_line: String,
    pub machine: Machine,
    pub commands: Vec<CommandPoint>,
    pub half_load: Option<HalfLoad>,
    pub queries: Vec<QueryPoint>,
    pub watchers: Option<Watchers>,
    /// Stage `cluster`: one NATS node against a 3-node R3 cluster, `--ack` local and
    /// replicated.
    pub cluster: Vec<crate::stages::cluster::ClusterPoint>,
    /// Stage `failover`: writer kill → first acknowledgement by the standby; catch-up rate.
    pub failover: Option<crate::stages::failover::Failover>,
    /// Stage `mixed`: reads while commands saturate the machine.
    pub mixed: Option<crate::stages::mixed::Mixed>,
    pub relay_drain: Option<Drain>,
    pub consumer_drain: Option<Drain>,
    pub jetstream_publish: Option<Ceiling>,
    pub ordered_read: Option<Ceiling>,
    pub rebuild: Option<Drain>,
    pub growth: Vec<GrowthPoint>,
    pub observability: Vec<crate::stages::observability::ObservabilityPoint>,
    pub layer_costs: crate::stages::observability::LayerCost,
    /// Stage `security`: plaintext vs TLS, tokens, mTLS, JWT.
    pub security: Vec<crate::stages::observability::ObservabilityPoint>,
    /// Stage `overload`: open-loop load at a multiple of capacity.
    pub overload: Option<crate::stages::overload::Overload>,
    pub targets: Vec<Target>,
}

fn f(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

fn errors(s: &RunSummary) -> String {
    if s.errors.is_empty() {
        "none".into()
    } else {
        s.errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Results {
    /// The markdown report.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "## Run of {} ({} mode)\n", self.started_at, self.mode);
        let _ = writeln!(md, "`{}`\n", self.command_line);
        let _ = writeln!(
            md,
            "Machine: {} cores ({}), {:.0} GiB RAM, disk {}, kernel {}. {}; {}; build profile {}.",
            m.cores, m.cpu, m.memory_gib, m.disk, m.kernel, m.rustc, m.nats_server, m.profile
        );
        let crates: Vec<String> = m.crates.iter().map(|(n, v)| format!("{n} {v}")).collect();
        let _ = writeln!(md, "Crates: {}.\n", crates.join(", "));

        if !self.targets.is_empty() {
            let _ = writeln!(
                md,
                "### Targets\n\n| target | goal | measured | met |\n|---|---|---|---|"
            );
            for t in &self.targets {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    t.id,
                    t.goal,
                    t.measured,
                    if t.met { "yes" } else { "**no**" }
                );
            }
            md.push('\n');
        }

        if !self.commands.is_empty() {
            let _ = writeln!(
                md,
                "### Commands (durable, mixed workload)\n\n\
                 | clients | connections | commands/s | echo ceiling/s | ratio | sled group-commit ceiling/s | events/command | p50 ms | p99 ms | p99.9 ms | max query lag (events) | drain after load (s) | errors |\n\
                 |---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for p in &self.commands {
                let c = &p.commands;
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {:.2} | {} |",
                    c.concurrency,
                    c.connections,
                    f(c.per_second),
                    f(p.echo.per_second),
                    pct(p.ratio_to_echo),
                    f(p.sled_ceiling.per_second),
                    p.events_per_command,
                    f(c.latency.p50_ms),
                    f(c.latency.p99_ms),
                    f(c.latency.p999_ms),
                    p.max_query_lag,
                    p.drain_s,
                    errors(c)
                );
            }
            let _ = writeln!(
                md,
                "\nAck → visible (reply of a sampled command until a query with its `min_position` returned it), and where the \
                 CPU went (cores used by each process; the machine has {}):\n\n\
                 | clients | visible p50 ms | visible p99 ms | visible p99.9 ms | sync p50 / p99 / max ms | commands per sync | CPU (cores) |\n|---|---|---|---|---|---|---|",
                self.machine.cores
            );
            for p in &self.commands {
                let v = &p.visibility;
                let cpu: Vec<String> = p.cpu.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} / {} / {} | {:.1} | {} |",
                    p.commands.concurrency,
                    f(v.p50_ms),
                    f(v.p99_ms),
                    f(v.p999_ms),
                    f(p.syncs.p50_ms),
                    f(p.syncs.p99_ms),
                    f(p.syncs.max_ms),
                    p.syncs.commands_per_sync,
                    cpu.join(", ")
                );
            }
            md.push('\n');
        }

        if let Some(h) = &self.half_load {
            let c = &h.commands;
            let _ = writeln!(
                md,
                "### Half load\n\nPaced at {} commands/s (half the best rate above) with {} clients: achieved {}/s, \
                 p50 {} ms, p99 {} ms, p99.9 {} ms; ack → visible p50 {} ms, p99 {} ms; max query lag {} events. \
                 Group commit meanwhile: sync (sled flush + fdatasync) p50 {} ms, p99 {} ms, max {} ms, {:.1} commands per sync.\n",
                f(h.target_rate),
                c.concurrency,
                f(c.per_second),
                f(c.latency.p50_ms),
                f(c.latency.p99_ms),
                f(c.latency.p999_ms),
                f(h.visibility.p50_ms),
                f(h.visibility.p99_ms),
                h.max_query_lag,
                f(h.syncs.p50_ms),
                f(h.syncs.p99_ms),
                f(h.syncs.max_ms),
                h.syncs.commands_per_sync
            );
        }

        if let Some(w) = &self.watchers {
            let _ = writeln!(
                md,
                "### Idle watchers\n\nThe same load paced at {} commands/s, without and with {} idle WatchCustomer streams open:\n\n| | events applied/s | query-server CPU per 1k events (core-ms) | ack → visible p50 ms | p99 ms |\n|---|---|---|---|---|",
                f(w.rate),
                w.watchers
            );
            for (name, r) in [("without", &w.without), ("with", &w.with)] {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {} | {} |",
                    f(r.events_per_second),
                    f(r.query_cpu_ms_per_1k_events),
                    f(r.visibility.p50_ms),
                    f(r.visibility.p99_ms)
                );
            }
            md.push('\n');
        }

        if !self.cluster.is_empty() {
            let _ = writeln!(
                md,
                "### NATS cluster and `--ack replicated`\n\nThe command workload at the reference concurrency, a fresh stack per run (NATS, both servers), configurations alternating round by round; the run with the median rate:\n\n| configuration | commands/s (median) | each run | p50 ms | p99 ms | p99.9 ms | CPU (cores) |\n|---|---|---|---|---|---|---|"
            );
            for p in &self.cluster {
                let runs: Vec<String> = p.runs.iter().map(|r| f(*r)).collect();
                let cpu: Vec<String> = p
                    .cpu
                    .iter()
                    .map(|(n, c)| format!("{n} {}", f(*c)))
                    .collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    p.config,
                    f(p.median.per_second),
                    runs.join(" / "),
                    f(p.median.latency.p50_ms),
                    f(p.median.latency.p99_ms),
                    f(p.median.latency.p999_ms),
                    cpu.join(", ")
                );
            }
            md.push('\n');
        }

        if let Some(fo) = &self.failover {
            let _ = writeln!(
                md,
                "### Failover\n\nA writer and a hot standby on one NATS node, `--ack replicated --lease-ttl-ms {}`, one client restocking through whichever writes; the writer `kill -9`ed {} times (restarted as the standby after each): from the kill to the first command acknowledged by the new writer, p50 **{} ms**, max **{} ms** (each: {} ms). A standby started with an empty data dir read back {} events from the stream in {} s: **{} events/s** (from its spawn until its log held them all).\n",
                fo.lease_ttl_ms,
                fo.trials_ms.len(),
                f(fo.p50_ms),
                f(fo.max_ms),
                fo.trials_ms.iter().map(|t| f(*t)).collect::<Vec<_>>().join(", "),
                fo.catch_up_events,
                f(fo.catch_up_seconds),
                f(fo.catch_up_per_second)
            );
        }

        if let Some(m) = &self.mixed {
            let _ = writeln!(
                md,
                "### Reads during writes\n\n{} readers paced at {} reads/s in all, on an idle stack, then while {} clients send the command workload {}:\n\n| query | idle p50 ms | idle p99 ms | during writes p50 ms | p99 ms | p99 ratio | commands/s meanwhile | command p99 ms | command-server / query-server / nats / bench cores |\n|---|---|---|---|---|---|---|---|---|",
                m.readers,
                f(m.read_rate),
                m.writers,
                m.write_rate.map_or("as fast as it is answered".to_string(), |r| format!("paced at {} commands/s", f(r)))
            );
            for q in [&m.get_order, &m.list_orders] {
                let cores: Vec<String> = q.cpu.iter().map(|(_, c)| f(*c)).collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {}x | {} | {} | {} |",
                    q.idle.name,
                    f(q.idle.latency.p50_ms),
                    f(q.idle.latency.p99_ms),
                    f(q.loaded.latency.p50_ms),
                    f(q.loaded.latency.p99_ms),
                    f(q.p99_ratio()),
                    f(q.commands.per_second),
                    f(q.commands.latency.p99_ms),
                    cores.join(" / ")
                );
            }
            md.push('\n');
        }

        if !self.queries.is_empty() {
            let _ = writeln!(
                md,
                "### Queries\n\n| clients | GetOrder/s | echo GetOrder/s | ratio | GetOrder p99 ms | ListOrders (20/page)/s | ListOrders p99 ms | errors |\n|---|---|---|---|---|---|---|---|"
            );
            for q in &self.queries {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    q.get_order.concurrency,
                    f(q.get_order.per_second),
                    f(q.echo.per_second),
                    pct(q.ratio_to_echo),
                    f(q.get_order.latency.p99_ms),
                    f(q.list_orders.per_second),
                    f(q.list_orders.latency.p99_ms),
                    errors(&q.get_order)
                );
            }
            md.push('\n');
        }

        let _ = writeln!(md, "### Pipeline\n\n| stage | events/s | ceiling | ceiling events/s | ratio |\n|---|---|---|---|---|");
        let js = self
            .jetstream_publish
            .as_ref()
            .map_or(0.0, |c| c.per_second);
        let oc = self.ordered_read.as_ref().map_or(0.0, |c| c.per_second);
        if let Some(d) = &self.relay_drain {
            let _ = writeln!(
                md,
                "| relay: publish a {}-event backlog | {} | raw JetStream publish | {} | {} |",
                d.events,
                f(d.per_second),
                f(js),
                pct(d.per_second / js.max(1e-9))
            );
        }
        if let Some(d) = &self.consumer_drain {
            let _ = writeln!(
                md,
                "| query server: apply a {}-event backlog | {} | raw ordered consumer | {} | {} |",
                d.events,
                f(d.per_second),
                f(oc),
                pct(d.per_second / oc.max(1e-9))
            );
        }
        if let Some(d) = &self.rebuild {
            let _ = writeln!(
                md,
                "| `query-server rebuild` of {} events | {} | raw ordered consumer | {} | {} |",
                d.events,
                f(d.per_second),
                f(oc),
                pct(d.per_second / oc.max(1e-9))
            );
        }
        for c in [&self.jetstream_publish, &self.ordered_read]
            .into_iter()
            .flatten()
        {
            let _ = writeln!(md, "\n{}: {}/s ({}).", c.name, f(c.per_second), c.detail);
        }
        md.push('\n');

        if !self.growth.is_empty() {
            let _ = writeln!(
                md,
                "### Growth\n\n| events in log | commands/s | vs empty log | command-server RSS MB | query-server RSS MB | command-server start s (again) | query-server start s (again) | command data MB | query data MB |\n|---|---|---|---|---|---|---|---|---|"
            );
            for g in &self.growth {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {:.2} ({:.2}) | {:.2} ({:.2}) | {} | {} |",
                    g.events_in_log,
                    f(g.commands_per_second),
                    pct(g.ratio_to_empty),
                    f(g.command_server_rss_mb),
                    f(g.query_server_rss_mb),
                    g.command_server_start_s,
                    g.command_server_restart_s,
                    g.query_server_start_s,
                    g.query_server_restart_s,
                    f(g.command_data_mb),
                    f(g.query_data_mb)
                );
            }
            md.push('\n');
        }
        md.push_str(&crate::stages::observability::markdown(
            crate::stages::observability::Stage::Observability,
            &self.observability,
            &self.layer_costs,
            self.observability.first().and_then(|p| p.paced_rate),
        ));
        md.push_str(&crate::stages::observability::markdown(
            crate::stages::observability::Stage::Security,
            &self.security,
            &self.layer_costs,
            self.security.first().and_then(|p| p.paced_rate),
        ));
        if let Some(o) = &self.overload {
            md.push_str(&crate::stages::overload::markdown(o));
        }
        md
    }

    /// Writes `results.json`, `report.md`, `throughput.svg` and `latency-cdf.svg`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        let throughput: Vec<(String, Vec<(f64, f64)>)> = self
            .commands
            .iter()
            .map(|p| {
                let points = p
                    .commands
                    .timeline
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64 + 0.5, *v as f64))
                    .collect();
                (format!("{} clients", p.commands.concurrency), points)
            })
            .collect();
        std::fs::write(
            dir.join("throughput.svg"),
            line_chart(
                "Durable commands per second over each run",
                "seconds into the run",
                "commands/s",
                &throughput,
                false,
            ),
        )?;
        let mut cdf: Vec<(String, Vec<(f64, f64)>)> = self
            .commands
            .iter()
            .map(|p| {
                (
                    format!("commands, {} clients", p.commands.concurrency),
                    p.commands.latency.cdf.clone(),
                )
            })
            .collect();
        if let Some(h) = &self.half_load {
            cdf.push((
                "commands at half load".into(),
                h.commands.latency.cdf.clone(),
            ));
            cdf.push((
                "ack → visible at half load".into(),
                h.visibility.cdf.clone(),
            ));
        }
        let cdf: Vec<(String, Vec<(f64, f64)>)> = cdf
            .into_iter()
            .map(|(name, points)| {
                (
                    name,
                    points
                        .into_iter()
                        .map(|(ms, q)| (ms.max(0.01), q * 100.0))
                        .collect(),
                )
            })
            .collect();
        std::fs::write(
            dir.join("latency-cdf.svg"),
            line_chart(
                "Latency CDF",
                "latency (ms, log scale)",
                "% of requests at or below",
                &cdf,
                true,
            ),
        )?;
        Ok(())
    }
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A plain SVG line chart.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> String {
    let (w, h) = (860.0, 480.0);
    let (left, right, top, bottom) = (80.0, 220.0, 40.0, 60.0);
    let tx = |x: f64| if log_x { x.max(1e-3).log10() } else { x };
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, y)| (tx(x), y)))
        .collect();
    let (mut x0, mut x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let y1 = points.iter().fold(0.0f64, |a, p| a.max(p.1)).max(1e-9) * 1.05;
    if points.is_empty() || x0 >= x1 {
        x0 = 0.0;
        x1 = 1.0;
    }
    let sx = |x: f64| left + (tx(x) - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| h - bottom - y / y1 * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" font-size=\"16\" text-anchor=\"middle\">{}</text>\n",
        w / 2.0,
        xml(title)
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom
    );
    for i in 0..=5 {
        let y = y1 * i as f64 / 5.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3}\" text-anchor=\"end\">{4}</text>",
            sy(y),
            w - right,
            left - 6.0,
            sy(y) + 4.0,
            short(y)
        );
        let xv = x0 + (x1 - x0) * i as f64 / 5.0;
        let label = if log_x {
            short(10f64.powf(xv))
        } else {
            short(xv)
        };
        let px = left + (xv - x0) / (x1 - x0) * (w - left - right);
        let _ = writeln!(
            svg,
            "<text x=\"{px}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            h - bottom + 18.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        left + (w - left - right) / 2.0,
        h - 16.0,
        xml(x_label)
    );
    let _ = writeln!(
        svg,
        "<text x=\"18\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {0})\">{1}</text>",
        top + (h - top - bottom) / 2.0,
        xml(y_label)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/><text x=\"{2}\" y=\"{3}\">{4}</text>",
            w - right + 12.0,
            w - right + 32.0,
            w - right + 38.0,
            ly + 4.0,
            xml(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn short(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
