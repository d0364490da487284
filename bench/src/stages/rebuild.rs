//! Rebuild: `query-server rebuild` over the whole stream, process start included.

use std::path::Path;
use std::time::Instant;

use super::Stack;
use crate::report::{Drain, Results};
use crate::{say, workload};

pub async fn run(stack: &mut Stack, bin_dir: &Path, results: &mut Results) -> anyhow::Result<()> {
    let Stack {
        nats,
        query,
        command_channel,
        ..
    } = stack;
    query.terminate();
    let events = workload::log_position(command_channel.clone()).await?;
    let t = Instant::now();
    let out = std::process::Command::new(bin_dir.join("query-server"))
        .arg("rebuild")
        .arg("--data-dir")
        .arg(&query.data_dir)
        .arg("--nats-url")
        .arg(nats.url())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rebuild failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seconds = t.elapsed().as_secs_f64();
    results.rebuild = Some(Drain {
        events,
        seconds,
        per_second: events as f64 / seconds.max(1e-9),
    });
    say(format!(
        "rebuild: {events} events in {seconds:.2}s = {:.0} events/s (process start included)",
        events as f64 / seconds
    ));
    Ok(())
}
