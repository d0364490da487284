//! Live watches: one broadcast channel per watched view (any kind: see
//! [`crate::projections::View`]), and the stream a watcher reads.
//!
//! The consumer publishes every change of a watched view after the batch holding it is
//! committed; publishing never blocks (a broadcast send only overwrites the oldest slot),
//! so a slow watcher cannot stall the consumer. A watcher that falls more than
//! `WATCH_BUFFER` changes behind is told it lagged and skips to the latest state. Memory
//! is bounded by the number of watched keys × `WATCH_BUFFER`, and watchers are capped.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use crate::projections::{Update, View, ViewKey};

/// Changes buffered per watched key before a slow watcher lags.
pub const WATCH_BUFFER: usize = 16;

/// Why a watch cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("too many watchers ({0}); try again later")]
    TooMany(usize),
    #[error("the query server is shutting down")]
    Closed,
}

/// The registry of watched keys.
pub struct Watchers {
    channels: Mutex<HashMap<ViewKey, broadcast::Sender<Update>>>,
    active: AtomicUsize,
    max: usize,
    closed: AtomicBool,
}

/// Counts one active watcher; dropping it releases the slot.
pub struct WatchSlot {
    watchers: Arc<Watchers>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.watchers.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Watchers {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Watchers {
            channels: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            max,
            closed: AtomicBool::new(false),
        })
    }

    /// Number of open watches.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Subscribes to changes of `key`. Subscribe before reading the current view, so no
    /// change can fall between the read and the subscription.
    pub fn subscribe(
        self: &Arc<Self>,
        key: ViewKey,
    ) -> Result<(broadcast::Receiver<Update>, WatchSlot), WatchError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(WatchError::Closed);
        }
        let previous = self.active.fetch_add(1, Ordering::AcqRel);
        let slot = WatchSlot {
            watchers: self.clone(),
        };
        if previous >= self.max {
            return Err(WatchError::TooMany(self.max));
        }
        let mut channels = self.channels.lock().map_err(|_| WatchError::Closed)?;
        let sender = channels
            .entry(key)
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0);
        Ok((sender.subscribe(), slot))
    }

    /// The keys watched right now (empty, and cheap, when nobody watches).
    pub fn watched(&self) -> HashSet<ViewKey> {
        match self.channels.lock() {
            Ok(channels) if !channels.is_empty() => channels.keys().cloned().collect(),
            _ => HashSet::new(),
        }
    }

    /// Sends committed changes; drops channels nobody listens to any more.
    pub fn publish(&self, updates: Vec<(ViewKey, Update)>) {
        let Ok(mut channels) = self.channels.lock() else {
            return;
        };
        for (key, update) in updates {
            let gone = match channels.get(&key) {
                Some(sender) => sender.send(update).is_err(),
                None => false,
            };
            if gone {
                channels.remove(&key);
            }
        }
        channels.retain(|_, sender| sender.receiver_count() > 0);
    }

    /// Ends every watch (shutdown): receivers see their channel closed.
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        if let Ok(mut channels) = self.channels.lock() {
            channels.clear();
        }
    }
}

/// A watch's answers.
pub type WatchStream<V> = Pin<Box<dyn Stream<Item = Result<V, Status>> + Send>>;

/// A watch: the current view, then each newer change (by [`View::position`]); after
/// lagging, the latest state (`reload`). Ends with UNAVAILABLE when the server shuts
/// down.
pub fn watch_stream<V: View>(
    current: V,
    receiver: broadcast::Receiver<Update>,
    slot: WatchSlot,
    reload: impl Fn() -> Option<V> + Send + 'static,
) -> WatchStream<V> {
    struct State<V, R> {
        first: Option<V>,
        last_position: u64,
        receiver: broadcast::Receiver<Update>,
        _slot: WatchSlot,
        reload: R,
        done: bool,
    }
    let state = State {
        last_position: current.position(),
        first: Some(current),
        receiver,
        _slot: slot,
        reload,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, move |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((Ok(first), st));
        }
        if st.done {
            return None;
        }
        loop {
            let next = match st.receiver.recv().await {
                Ok(update) => update.view::<V>().cloned(),
                Err(RecvError::Lagged(_)) => (st.reload)(),
                Err(RecvError::Closed) => {
                    st.done = true;
                    return Some((
                        Err(Status::unavailable(
                            "the query server is shutting down; watch again",
                        )),
                        st,
                    ));
                }
            };
            if let Some(view) = next {
                if view.position() > st.last_position {
                    st.last_position = view.position();
                    return Some((Ok(view), st));
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_shared::pb;

    #[tokio::test]
    async fn slow_watchers_lag_instead_of_blocking() {
        let watchers = Watchers::new(10);
        let key = ViewKey::of::<pb::Order>("o");
        let (mut rx, _slot) = watchers.subscribe(key.clone()).expect("subscribe");
        for version in 0..(WATCH_BUFFER as u64 * 3) {
            let order = pb::Order {
                version,
                ..Default::default()
            };
            watchers.publish(vec![(key.clone(), Update::new(order))]);
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        let Ok(update) = rx.recv().await else {
            panic!("expected an update after lagging")
        };
        assert!(update
            .view::<pb::Order>()
            .is_some_and(|o| o.version >= WATCH_BUFFER as u64));
    }

    #[test]
    fn watchers_are_capped_and_released() {
        let watchers = Watchers::new(1);
        let first = watchers
            .subscribe(ViewKey::of::<pb::Customer>("a"))
            .expect("first");
        assert!(matches!(
            watchers.subscribe(ViewKey::of::<pb::Customer>("b")),
            Err(WatchError::TooMany(1))
        ));
        assert_eq!(watchers.active(), 1);
        drop(first);
        assert_eq!(watchers.active(), 0);
        watchers.publish(vec![]);
        assert!(watchers.watched().is_empty());
    }
}
