//! Background tasks (the relay, the policy, the consumer): what their errors mean and
//! how they wait. An error is [`Transient`](Severity::Transient) (NATS away, a gap the
//! relay will fill: retried with capped backoff) or [`Fatal`](Severity::Fatal) (the
//! stream and the log disagree, storage failed, a bug: the task stops and health says
//! why). A panicked blocking task is a bug, so fatal, never retried.

use std::time::Duration;

use tokio::sync::watch;

/// How a background task reacts to an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Retried with backoff; the task goes on.
    Transient,
    /// The task stops.
    Fatal,
}

/// An error of a background task, by kind.
pub trait TaskError: std::error::Error {
    fn severity(&self) -> Severity;
}

/// Why a blocking step did not return: it panicked (or was cancelled at shutdown).
#[derive(Debug, thiserror::Error)]
#[error("a blocking task of the {what} failed: {source}")]
pub struct Panicked {
    pub what: &'static str,
    pub source: tokio::task::JoinError,
}

/// Runs `work` on the blocking pool; a panic comes back as [`Panicked`] (fatal).
pub async fn blocking<T, E>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<Result<T, E>, Panicked>
where
    T: Send + 'static,
    E: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| Panicked { what, source })
}

/// Capped exponential backoff between a task's attempts, logging the first failure
/// and every tenth after it (an outage is not a log flood).
pub struct Backoff {
    task: &'static str,
    attempt: usize,
    delay_max: Duration,
}

impl Backoff {
    pub fn new(task: &'static str, delay_max: Duration) -> Self {
        Backoff {
            task,
            attempt: 0,
            delay_max,
        }
    }

    /// Attempts failed in a row.
    pub fn attempts(&self) -> usize {
        self.attempt
    }

    /// After a success: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn failed(&mut self, error: &dyn std::fmt::Display) -> Duration {
        self.attempt += 1;
        if self.attempt == 1 || self.attempt % 10 == 0 {
            tracing::warn!(task = self.task, %error, attempt = self.attempt, "paused; retrying with backoff");
        }
        crate::nats::reconnect_delay(self.attempt + 1).min(self.delay_max)
    }

    /// Records a failure and waits before the next attempt, or until `stop` changes.
    pub async fn wait(
        &mut self,
        error: &(dyn std::fmt::Display + Sync),
        stop: &mut watch::Receiver<bool>,
    ) {
        let delay = self.failed(error);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
}

/// How long a task gives a NATS client that is (re)connecting in the background before
/// it counts an attempt as failed.
pub const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// Waits until `client` is connected, at most `within` (or until `stop` is set):
/// whether it is.
pub async fn wait_connected(
    client: &async_nats::Client,
    within: Duration,
    stop: &watch::Receiver<bool>,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !crate::nats::is_connected(client) {
        if tokio::time::Instant::now() >= deadline || *stop.borrow() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_blocking_step_is_reported_not_propagated() {
        let outcome = blocking("test", || -> Result<(), ()> { panic!("bug") }).await;
        assert!(matches!(outcome, Err(Panicked { what: "test", .. })));
        let fine = blocking("test", || Ok::<_, ()>(7)).await;
        assert!(matches!(fine, Ok(Ok(7))));
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new("test", Duration::from_millis(300));
        let delays: Vec<Duration> = (0..12).map(|_| backoff.failed(&"down")).collect();
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays.last(), Some(&Duration::from_millis(300)));
        assert_eq!(backoff.attempts(), 12);
        backoff.reset();
        assert_eq!(backoff.failed(&"down"), delays[0]);
    }

    #[tokio::test]
    async fn a_backoff_wait_ends_when_stopped() {
        let mut backoff = Backoff::new("test", Duration::from_secs(3600));
        for _ in 0..20 {
            backoff.failed(&"down");
        }
        let (stop, mut stopped) = watch::channel(false);
        let waiting = tokio::spawn(async move { backoff.wait(&"down", &mut stopped).await });
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends at stop")
            .expect("joined");
    }
}
