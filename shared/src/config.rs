//! Flags both binaries take. Every flag also reads an environment variable; `--help`
//! lists both. They are `global` so that subcommands (`query-server rebuild`) take them.

use crate::subjects::DEFAULT_STREAM;

/// Where the event bus is.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL (JetStream must be enabled).
    #[arg(
        long,
        env = "SHOP_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,

    /// JetStream stream that carries the events.
    #[arg(long, env = "SHOP_STREAM", default_value = DEFAULT_STREAM, value_parser = parse_stream_name, global = true)]
    pub stream: String,
}

/// How the process logs.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "SHOP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter, `tracing` EnvFilter syntax (e.g. `info,command_server=debug`).
    #[arg(long = "log", env = "SHOP_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

/// Log line format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// JetStream stream names may not contain `.`, `*`, `>`, path separators or whitespace.
pub fn parse_stream_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{name:?} is not a valid JetStream stream name (no '.', '*', '>', slashes or spaces)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        assert!(parse_stream_name("SHOP_EVENTS").is_ok());
        assert!(parse_stream_name("a.b").is_err());
        assert!(parse_stream_name("").is_err());
        assert!(parse_stream_name("a b").is_err());
    }
}
