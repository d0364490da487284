//! `shop-log`: the operator's view of a command server's event log, for the case where
//! the server refuses to serve because its log holds events the stream lacks (`--ack
//! local`, after a failover: see README, Running more than one machine), and for
//! quarantine files (`--ack replicated`).
//!
//! - `shop-log export --data-dir DIR --from P [--to Q]`: the log's events from position
//!   P, one JSON object per line (the envelope: position, event id, command id, stream,
//!   payload...), on stdout. The server must be stopped (sled locks its data dir).
//! - `shop-log quarantine FILE`: the events of a quarantine file, the same way.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use command_server::failover::reconcile::read_quarantine;
use command_server::log::{Durability, EventLog};

#[derive(Parser)]
#[command(
    name = "shop-log",
    version,
    about = "Shows and exports a command server's events as JSON lines."
)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// The log's events from a position on (the server must be stopped).
    Export {
        /// The command server's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// First position to export.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Last position to export (default: the log's last).
        #[arg(long)]
        to: Option<u64>,
    },
    /// The events of a quarantine file (`<data-dir>/quarantine/*.events`).
    Quarantine { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let pool = prost_reflect::DescriptorPool::decode(shop_shared::FILE_DESCRIPTOR_SET)
        .context("the compiled-in protobuf descriptors")?;
    let envelope = pool
        .get_message_by_name("shop.v1.EventEnvelope")
        .context("EventEnvelope descriptor")?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut print = |bytes: &[u8]| -> anyhow::Result<()> {
        let message = prost_reflect::DynamicMessage::decode(envelope.clone(), bytes)
            .context("an event that does not decode")?;
        serde_json::to_writer(&mut out, &message)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    match Cli::parse().command {
        Action::Export { data_dir, from, to } => {
            let log = open(&data_dir)?;
            let to = match to {
                Some(to) => to,
                None => log.last_position()?,
            };
            let mut next = from;
            while next <= to {
                let chunk = log.read_range(next, to, 1024)?;
                let Some((last, _)) = chunk.last() else { break };
                next = last + 1;
                for (_, bytes) in &chunk {
                    print(bytes)?;
                }
            }
        }
        Action::Quarantine { file } => {
            for bytes in
                read_quarantine(&file).with_context(|| format!("reading {}", file.display()))?
            {
                print(&bytes)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn open(dir: &Path) -> anyhow::Result<EventLog> {
    anyhow::ensure!(
        dir.join("db").exists(),
        "{} holds no event log (no `db` file)",
        dir.display()
    );
    EventLog::open(dir, Durability::Flush, 16 << 20).with_context(|| {
        format!(
            "opening the event log in {} (is its server still running?)",
            dir.display()
        )
    })
}
