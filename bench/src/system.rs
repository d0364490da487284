//! What machine this is, process memory, directory sizes, and finding the binaries.

use std::path::Path;
use std::process::Command;

use crate::report::Machine;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn run(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .trim()
            .to_string()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// Cores, CPU, memory, the disk under `data_dir`, versions.
pub fn machine(data_dir: &Path, nats_bin: &Path) -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kb: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let df = run("df", &["-hT", &data_dir.to_string_lossy()]);
    let disk = df
        .lines()
        .nth(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!(
                "{} ({}, {} total)",
                f.first().unwrap_or(&"?"),
                f.get(1).unwrap_or(&"?"),
                f.get(2).unwrap_or(&"?")
            )
        })
        .unwrap_or_else(|| "unknown".into());
    let lock = include_str!("../../Cargo.lock");
    let crates = [
        "tonic",
        "prost",
        "sled",
        "async-nats",
        "tokio",
        "hyper",
        "h2",
    ]
    .iter()
    .filter_map(|name| {
        let needle = format!("name = \"{name}\"\nversion = \"");
        let at = lock.find(&needle)? + needle.len();
        let version = lock[at..].split('"').next()?;
        Some((name.to_string(), version.to_string()))
    })
    .collect();
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu,
        memory_gib: mem_kb / 1024.0 / 1024.0,
        disk,
        kernel: run("uname", &["-r"]),
        rustc: run("rustc", &["--version"]),
        nats_server: run(&nats_bin.to_string_lossy(), &["--version"]),
        crates,
        profile: if cfg!(debug_assertions) {
            "debug".into()
        } else {
            "release".into()
        },
    }
}

/// Resident memory of a process, in MB.
pub fn rss_mb(pid: u32) -> f64 {
    read(&format!("/proc/{pid}/status"))
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Bytes under a directory.
pub fn dir_mb(dir: &Path) -> f64 {
    fn size(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|d| d.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    size(dir) as f64 / 1e6
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/pid/stat, i.e. 11 and 12 here.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    run("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

/// CPU used by each named process between two snapshots, in cores.
pub struct CpuMeter {
    processes: Vec<(String, u32, f64)>,
    start: std::time::Instant,
}

impl CpuMeter {
    pub fn start(processes: &[(&str, Option<u32>)]) -> CpuMeter {
        CpuMeter {
            processes: processes
                .iter()
                .filter_map(|(name, pid)| pid.map(|p| (name.to_string(), p, cpu_seconds(p))))
                .collect(),
            start: std::time::Instant::now(),
        }
    }

    pub fn stop(&self) -> Vec<(String, f64)> {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        self.processes
            .iter()
            .map(|(name, pid, before)| (name.clone(), (cpu_seconds(*pid) - before) / wall))
            .collect()
    }
}
