//! Cluster: the command workload at the reference concurrency on one NATS node with
//! `--ack local`, on a 3-node cluster with the stream at three replicas and `--ack local`,
//! and on the same cluster with `--ack replicated`; a fresh stack for every run, the
//! configurations alternating over `--rounds`.

use serde::Serialize;
use shop_tests::cluster::{NatsCluster, NODES};
use shop_tests::{Nats, Server, ServerKind};

use crate::stats::RunSummary;
use crate::workload::{self, Catalog};
use crate::{load, say, system, Args};

/// One configuration: its name, whether on the cluster, the command server's flags.
const CONFIGS: [(&str, bool, &[&str]); 3] = [
    ("1 node, --ack local", false, &[]),
    ("3 nodes R3, --ack local", true, &["--stream-replicas", "3"]),
    (
        "3 nodes R3, --ack replicated",
        true,
        &["--stream-replicas", "3", "--ack", "replicated"],
    ),
];

/// Cores used by each process.
type Cpu = Vec<(String, f64)>;

#[derive(Debug, Clone, Serialize)]
pub struct ClusterPoint {
    pub config: String,
    /// Commands/s of each run, in round order.
    pub runs: Vec<f64>,
    /// The run with the median commands/s.
    pub median: RunSummary,
    /// CPU (cores) of each process in the median run (the NATS nodes summed).
    pub cpu: Cpu,
}

pub async fn run(args: &Args, catalog: Catalog) -> anyhow::Result<Vec<ClusterPoint>> {
    let l = load(args.reference_clients, args);
    let rounds = args.rounds.max(1);
    let mut runs: Vec<Vec<(RunSummary, Cpu)>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        for k in 0..CONFIGS.len() {
            // Rotate the order round by round, so no configuration always runs first.
            let i = (k + round) % CONFIGS.len();
            let (name, cluster, flags) = CONFIGS[i];
            let (single, nodes) = if cluster {
                (None, Some(NatsCluster::start().await))
            } else {
                (Some(Nats::start()), None)
            };
            let urls = match (&single, &nodes) {
                (Some(n), _) => n.url(),
                (_, Some(c)) => c.urls(),
                _ => unreachable!("one of the two is started"),
            };
            let command = Server::start_on(ServerKind::Command, &urls, flags).await;
            let query = Server::start_on(ServerKind::Query, &urls, &[]).await;
            workload::setup(&command.endpoint().into(), catalog).await?;
            let mut processes = vec![
                ("command-server".to_string(), command.pid()),
                ("query-server".to_string(), query.pid()),
            ];
            match (&single, &nodes) {
                (Some(n), _) => processes.push(("nats-server".into(), n.pid())),
                (_, Some(c)) => {
                    processes.extend((0..NODES).map(|n| (format!("nats-server {n}"), c.pid(n))))
                }
                _ => {}
            }
            let named: Vec<(&str, Option<u32>)> =
                processes.iter().map(|(n, p)| (n.as_str(), *p)).collect();
            let meter = system::CpuMeter::start(&named);
            let run = workload::run_commands(
                &command.endpoint().into(),
                &format!("cl{round}-{i}"),
                catalog,
                &l,
                None,
            )
            .await?;
            let mut cpu = meter.stop();
            let nats_total: f64 = cpu
                .iter()
                .filter(|(n, _)| n.starts_with("nats-server"))
                .map(|(_, c)| c)
                .sum();
            cpu.retain(|(n, _)| !n.starts_with("nats-server"));
            cpu.push(("nats-server".into(), nats_total));
            say(format!(
                "cluster round {round} {name}: {:.0} commands/s, p50 {:.2} ms, p99 {:.2} ms",
                run.summary.per_second, run.summary.latency.p50_ms, run.summary.latency.p99_ms
            ));
            runs[i].push((run.summary, cpu));
            drop(command);
            drop(query);
        }
    }
    Ok(CONFIGS
        .iter()
        .zip(runs)
        .map(|((name, _, _), mut runs)| {
            let per_second: Vec<f64> = runs.iter().map(|(r, _)| r.per_second).collect();
            runs.sort_by(|a, b| a.0.per_second.total_cmp(&b.0.per_second));
            let (median, cpu) = runs.swap_remove(runs.len() / 2);
            ClusterPoint {
                config: name.to_string(),
                runs: per_second,
                median,
                cpu,
            }
        })
        .collect())
}
