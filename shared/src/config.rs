//! Flags both binaries take. Every flag also reads an environment variable; `--help`
//! lists both. They are `global` so that subcommands (`query-server rebuild`) take them.

use std::path::PathBuf;

use crate::subjects::DEFAULT_STREAM;

/// Where the event bus is.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL, or a comma-separated list of the servers of a cluster (the client
    /// connects to any and fails over to the others). JetStream must be enabled.
    #[arg(
        long,
        env = "SHOP_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_parser = parse_nats_urls,
        global = true
    )]
    pub nats_url: String,

    /// Replicas of the stream when the relay creates it (3 on a 3-node cluster: losing
    /// one node then loses no event). An existing stream with another count is refused.
    #[arg(
        long,
        env = "SHOP_STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=5),
        global = true
    )]
    pub stream_replicas: u16,

    /// JetStream stream that carries the events.
    #[arg(long, env = "SHOP_STREAM", default_value = DEFAULT_STREAM, value_parser = parse_stream_name, global = true)]
    pub stream: String,

    /// NATS credentials file (JWT and NKey seed, as `nsc` writes it).
    #[arg(
        long,
        env = "SHOP_NATS_CREDS",
        global = true,
        conflicts_with = "nats_user"
    )]
    pub nats_creds: Option<PathBuf>,

    /// NATS user name (with --nats-password).
    #[arg(
        long,
        env = "SHOP_NATS_USER",
        global = true,
        requires = "nats_password"
    )]
    pub nats_user: Option<String>,

    /// NATS password (with --nats-user). Prefer the environment variable to the flag:
    /// flags are visible to every user of the machine in the process list.
    #[arg(
        long,
        env = "SHOP_NATS_PASSWORD",
        global = true,
        requires = "nats_user",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,

    /// CA certificate (PEM) to verify the NATS server's TLS certificate; turns TLS to NATS on.
    #[arg(long, env = "SHOP_NATS_TLS_CA", global = true)]
    pub nats_tls_ca: Option<PathBuf>,
}

/// TLS, authentication and reflection of the gRPC server (README: Running securely). Everything off
/// by default: plaintext, no credentials asked.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "SHOP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "SHOP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require a client certificate signed by this CA (PEM): mutual TLS. A client without
    /// one fails the handshake. Needs --tls-cert.
    #[arg(long, env = "SHOP_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Tokens file: lines `ROLE SHA256_HEX_OF_TOKEN [NAME]` (roles writer, reader,
    /// admin; `#` comments), and `ROLE cert:SUBJECT` to give a client certificate's
    /// subject (e.g. `CN=orders-svc,O=Shop`) roles under mTLS. Re-read on SIGHUP. Turns
    /// authentication on: clients send `authorization: Bearer TOKEN`.
    #[arg(long, env = "SHOP_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// Accept JWTs signed with this public key (PEM; RSA for RS256, Ed25519 for EdDSA).
    /// Claims: `sub` (the principal), `exp` (required), `roles` (list). Turns
    /// authentication on.
    #[arg(long, env = "SHOP_AUTH_JWT_KEY")]
    pub auth_jwt_key: Option<PathBuf>,

    /// Serve gRPC server reflection (v1 and v1alpha; open to anyone, like health).
    #[arg(long, env = "SHOP_REFLECTION", value_enum, default_value_t = Switch::On)]
    pub reflection: Switch,
}

/// On or off.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switch {
    #[default]
    On,
    Off,
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

/// Metrics and traces (README: Observability); both off by default.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics; off when unset.
    /// Plain HTTP, at most 64 connections at once: bind it to an address only the
    /// monitoring network reaches.
    #[arg(long, env = "SHOP_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Export trace spans with OTLP over gRPC to this collector endpoint (e.g.
    /// `http://127.0.0.1:4317`); off when unset. An incoming W3C `traceparent` is
    /// honoured either way (log lines carry its trace id).
    #[arg(long, env = "SHOP_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// Share of new traces exported (0.0 to 1.0); a request whose `traceparent` says
    /// sampled is always exported, one that says not sampled never is.
    #[arg(long, env = "SHOP_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio, global = true)]
    pub otlp_sample_ratio: f64,
}

fn parse_ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{value:?} is not a ratio between 0.0 and 1.0")),
    }
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
impl NatsArgs {
    /// The servers of `--nats-url`, one per comma-separated entry.
    pub fn servers(&self) -> Vec<String> {
        nats_servers(&self.nats_url)
    }
}

fn nats_servers(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// `--nats-url`: one or more NATS server URLs, comma-separated, each one valid.
pub fn parse_nats_urls(urls: &str) -> Result<String, String> {
    let servers = nats_servers(urls);
    if servers.is_empty() {
        return Err("no NATS server URL given".into());
    }
    for server in &servers {
        server
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| format!("{server:?} is not a NATS server URL: {e}"))?;
    }
    Ok(servers.join(","))
}

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
    fn nats_urls_take_a_comma_separated_list() {
        assert_eq!(
            parse_nats_urls("nats://a:4222, nats://b:4223,nats://c:4224"),
            Ok("nats://a:4222,nats://b:4223,nats://c:4224".to_string())
        );
        assert_eq!(
            nats_servers("nats://a:4222,nats://b:4223"),
            ["nats://a:4222", "nats://b:4223"]
        );
        assert!(parse_nats_urls("").is_err());
        assert!(parse_nats_urls("nats://a:4222,nats://b:notaport")
            .is_err_and(|e| e.contains("nats://b:notaport")));
    }

    #[test]
    fn stream_names() {
        assert!(parse_stream_name("SHOP_EVENTS").is_ok());
        assert!(parse_stream_name("a.b").is_err());
        assert!(parse_stream_name("").is_err());
        assert!(parse_stream_name("a b").is_err());
    }

    #[test]
    fn sample_ratios() {
        assert_eq!(parse_ratio("0.01"), Ok(0.01));
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("NaN").is_err());
    }
}
