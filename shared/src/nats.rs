//! Connecting to NATS. The client is created at once and connects (and reconnects) in the
//! background with capped exponential backoff, so a server started before NATS neither
//! crash-loops nor hangs: it reports the outage in its logs and health instead.

use std::time::Duration;

use async_nats::connection::State;

use crate::config::NatsArgs;

/// Longest wait between reconnect attempts.
const RECONNECT_DELAY_MAX_MS: u64 = 2_000;

/// Why a NATS client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NATS credentials file {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] async_nats::ConnectError),
}

/// A NATS client that keeps trying to (re)connect forever, with the credentials and TLS
/// of `args` (`--nats-creds` or `--nats-user`/`--nats-password`, `--nats-tls-ca`).
pub async fn connect(args: &NatsArgs, name: &str) -> Result<async_nats::Client, ConnectError> {
    let url = args.nats_url.as_str();
    let mut options = async_nats::ConnectOptions::new();
    if let Some(path) = &args.nats_creds {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.clone(),
                    source,
                })?;
    }
    if let (Some(user), Some(password)) = (&args.nats_user, &args.nats_password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &args.nats_tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let url_for_log = url.to_string();
    let client = options
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(5)))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let url = url_for_log.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(%url, "connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%url, "disconnected from NATS; reconnecting in the background")
                    }
                    // Every failed reconnect attempt reports an I/O error: not news.
                    async_nats::Event::ClientError(error) => {
                        tracing::debug!(%url, %error, "NATS client error")
                    }
                    other => tracing::warn!(%url, event = %other, "NATS event"),
                }
            }
        })
        .connect(args.servers())
        .await?;
    Ok(client)
}

/// The expiry of each pull request of our consumers (the server's idle heartbeat is half
/// of it). A pull request dies with the nats-server that held it (a restart, a lost
/// cluster node), and the client notices only by missed heartbeats: with async-nats's
/// defaults (30 s requests, 15 s heartbeats) views and standbys stalled about 15 s after
/// every NATS restart (found by the chaos runner). Idle, this costs one request per
/// consumer every second.
pub const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// Backoff between reconnect attempts: 0 for the first, then doubling from 50 ms to 2 s.
pub fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts.min(16)).unwrap_or(16);
    let ms = 25u64
        .saturating_mul(1u64 << exp)
        .min(RECONNECT_DELAY_MAX_MS);
    Duration::from_millis(ms)
}

/// Whether the client currently has a live connection.
pub fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == State::Connected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(1000), Duration::from_millis(2000));
    }
}
