//! What machine this is, process memory, directory sizes, and finding the binaries.

use std::path::{Path, PathBuf};
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

/// The workspace root (for scripts and `.tools`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Makes sure the server binaries next to this one are built from the current sources
/// (same profile), and that a nats-server is available; returns the binaries' directory.
pub fn prepare_binaries() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no exe dir"))?;
    let mut build = Command::new("cargo");
    build.current_dir(workspace_root()).args([
        "build",
        "--bins",
        "-p",
        "command-server",
        "-p",
        "query-server",
    ]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    match build.status() {
        Ok(s) if s.success() => {}
        Ok(s) => anyhow::bail!("building the servers failed ({s})"),
        Err(e) => eprintln!(
            "cargo not available ({e}); using the binaries in {}",
            dir.display()
        ),
    }
    for bin in ["command-server", "query-server"] {
        anyhow::ensure!(
            dir.join(bin).exists(),
            "{} missing",
            dir.join(bin).display()
        );
    }
    if std::env::var_os("NATS_SERVER_BIN").is_none() {
        let out = Command::new(workspace_root().join("scripts/ensure-nats.sh")).output()?;
        anyhow::ensure!(
            out.status.success(),
            "scripts/ensure-nats.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // The harness reads it from the environment; set before any other thread runs.
        std::env::set_var("NATS_SERVER_BIN", bin);
    }
    std::env::set_var("SHOP_BIN_DIR", &dir);
    Ok(dir)
}
