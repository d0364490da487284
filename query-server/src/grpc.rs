//! `shop.v1.QueryService`: lookups, paginated lists, history, as-of reads and watches.
//!
//! - Every Get/List first waits until the consumer has applied `min_position` (a watch
//!   channel, no polling), bounded by the request deadline (5 s without one); otherwise
//!   UNAVAILABLE saying how far behind the server is.
//! - Lists walk a sled index from an opaque page token (the last key returned), so a page
//!   sequence over an unchanged view neither skips nor repeats an item.
//! - As-of reads fold the entity's stored events up to the cut-off with the same
//!   projection code that maintains the views.
//! - Every response carries `shop-applied-position` and `shop-lag-events` metadata, added
//!   by [`crate::freshness::FreshnessLayer`] once the handler has read.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use shop_shared::grpc::{invalid_argument, request_timeout, FieldViolation};
use shop_shared::ids::{validate_id, StreamId};
use shop_shared::pb;
use shop_shared::pb::query_service_server::QueryService;
use tokio::sync::broadcast::error::RecvError;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use prometheus_client::metrics::counter::Counter;

use crate::as_of::{cutoff, fold_merged, take_order, Cutoff};
use crate::consumer::ConsumerStatus;
use crate::history::{history_event, history_limit};
use crate::paging::{decode_token, encode_token, page_size, paginate};
use crate::projections::MemoryViews;
use crate::store::{self, Store, StoreError};
use crate::watch::{Update, WatchError, WatchKey, WatchSlot, Watchers};

/// Wait for `min_position` when the client set no deadline.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// The query service.
#[derive(Clone)]
pub struct Queries {
    pub store: Arc<Store>,
    pub status: Arc<ConsumerStatus>,
    pub watchers: Arc<Watchers>,
    pub descriptors: prost_reflect::DescriptorPool,
    pub stream: String,
    /// `shop_shed_requests_total`: a watch refused at the watcher limit is shed.
    pub shed: Counter,
}

fn store_failure(error: impl std::fmt::Display) -> Status {
    tracing::error!(%error, "store read failed");
    Status::internal("the view store could not be read")
}

fn bad(field: &str, description: impl Into<String>) -> Status {
    invalid_argument(&[FieldViolation::new(field, description)])
}

fn check_id(field: &str, id: &str) -> Result<(), Status> {
    validate_id(id).map_err(|e| bad(field, format!("{e} (ids match [A-Za-z0-9_-]{{1,64}})")))
}

impl Queries {
    /// Waits until `min_position` is applied, within the request's deadline.
    async fn wait_applied(&self, metadata: &MetadataMap, min_position: u64) -> Result<(), Status> {
        if min_position == 0 || self.status.applied() >= min_position {
            return Ok(());
        }
        // Answer a little before the client's own deadline, so it reads our reason.
        let wait = request_timeout(metadata)
            .map(|d| d.saturating_sub(d / 10).min(Duration::from_secs(60)))
            .unwrap_or(DEFAULT_WAIT);
        let mut applied = self.status.applied.subscribe();
        let reached = tokio::time::timeout(wait, applied.wait_for(|p| *p >= min_position)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => {
                let now = self.status.applied();
                Err(Status::unavailable(format!(
                    "the query server has applied events up to position {now}; position {min_position} is not applied yet \
                     ({} behind after waiting {} ms{}); retry later",
                    min_position.saturating_sub(now),
                    wait.as_millis(),
                    self.status.error().map(|e| format!("; consumer: {e}")).unwrap_or_default()
                )))
            }
        }
    }

    /// Runs a blocking store read off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(store_failure)?
            .map_err(store_failure)
    }

    /// An order with the customer's name joined in.
    fn order_with_name(store: &Store, mut order: pb::Order) -> Result<pb::Order, StoreError> {
        order.customer_name = store
            .customer(&order.customer_id)?
            .map(|c| c.name)
            .unwrap_or_default();
        Ok(order)
    }

    /// Folds streams' stored events, merged in position order, up to a cut-off.
    fn fold(store: &Store, streams: &[StreamId], cut: Cutoff) -> Result<MemoryViews, StoreError> {
        let mut events = Vec::new();
        for stream in streams {
            events.extend(store.stream_prefix_while(stream, |e| cut.keeps(e))?);
        }
        Ok(fold_merged(events))
    }

    fn customer_as_of(
        store: &Store,
        id: &str,
        cut: Cutoff,
    ) -> Result<Option<pb::Customer>, StoreError> {
        let mut streams = vec![StreamId::customer(id)];
        streams.extend(
            store
                .orders_of_customer(id)?
                .into_iter()
                .map(StreamId::order),
        );
        Ok(Self::fold(store, &streams, cut)?.customers.remove(id))
    }

    fn order_as_of(store: &Store, id: &str, cut: Cutoff) -> Result<Option<pb::Order>, StoreError> {
        let Some(current) = store.order(id)? else {
            return Ok(None);
        };
        let streams = [
            StreamId::order(id),
            StreamId::customer(&current.customer_id),
        ];
        let mut views = Self::fold(store, &streams, cut)?;
        Ok(take_order(&mut views, id))
    }

    fn product_as_of(
        store: &Store,
        sku: &str,
        cut: Cutoff,
    ) -> Result<Option<pb::Product>, StoreError> {
        Ok(Self::fold(store, &[StreamId::product(sku)], cut)?
            .products
            .remove(sku))
    }

    fn not_found(kind: &str, id: &str, cut: Option<Cutoff>) -> Status {
        match cut {
            None => Status::not_found(format!("{kind} {id:?} does not exist")),
            Some(c) => Status::not_found(format!("{kind} {id:?} did not exist {}", c.describe())),
        }
    }

    /// The wait an as-of read needs: its position must be applied too.
    fn wanted(min_position: u64, cut: Option<Cutoff>) -> u64 {
        match cut {
            Some(Cutoff::Position(p)) => min_position.max(p),
            _ => min_position,
        }
    }
}

type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl QueryService for Queries {
    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let (metadata, _, r) = request.into_parts();
        check_id("customer_id", &r.customer_id)?;
        let cut = cutoff(r.as_of_position, r.as_of_time.as_ref())?;
        self.wait_applied(&metadata, Self::wanted(r.min_position, cut))
            .await?;
        let id = r.customer_id.clone();
        let found = match cut {
            None => self.store.customer(&id).map_err(store_failure)?,
            Some(cut) => {
                self.blocking(move |s| Self::customer_as_of(s, &id, cut))
                    .await?
            }
        };
        found
            .map(Response::new)
            .ok_or_else(|| Self::not_found("customer", &r.customer_id, cut))
    }

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        if r.name_prefix.chars().count() > 200 {
            return Err(bad("name_prefix", "must be at most 200 characters"));
        }
        self.wait_applied(&metadata, r.min_position).await?;
        let prefix = store::customers_by_name_prefix(&r.name_prefix);
        let filter = format!(
            "customers|{}|{}",
            r.name_prefix.to_lowercase(),
            r.include_deleted
        );
        let after = decode_token(&r.page_token, &filter, &prefix)?;
        let size = page_size(r.page_size);
        let include_deleted = r.include_deleted;
        let (customers, next) = self
            .blocking(move |s| {
                paginate(s, &prefix, None, after, size, |id| {
                    let c = s.customer(&String::from_utf8_lossy(id))?;
                    Ok(c.filter(|c| include_deleted || c.status() != pb::CustomerStatus::Deleted))
                })
            })
            .await?;
        Ok(Response::new(pb::ListCustomersResponse {
            customers,
            next_page_token: next.map(|k| encode_token(&k, &filter)).unwrap_or_default(),
        }))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let (metadata, _, r) = request.into_parts();
        check_id("sku", &r.sku)?;
        let cut = cutoff(r.as_of_position, r.as_of_time.as_ref())?;
        self.wait_applied(&metadata, Self::wanted(r.min_position, cut))
            .await?;
        let sku = r.sku.clone();
        let found = match cut {
            None => self.store.product(&sku).map_err(store_failure)?,
            Some(cut) => {
                self.blocking(move |s| Self::product_as_of(s, &sku, cut))
                    .await?
            }
        };
        found
            .map(Response::new)
            .ok_or_else(|| Self::not_found("product", &r.sku, cut))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        self.wait_applied(&metadata, r.min_position).await?;
        let size = page_size(r.page_size);
        let (prefix, end, filter) = match r.max_available {
            Some(max) => (
                store::INDEX_PRODUCTS_BY_AVAILABLE.to_vec(),
                Some(store::products_by_available_end(max)),
                format!("products|max_available={max}"),
            ),
            None => (b"p".to_vec(), None, "products|all".to_string()),
        };
        let after = decode_token(&r.page_token, &filter, &prefix)?;
        let by_stock = r.max_available.is_some();
        let (products, next) = self
            .blocking(move |s| {
                paginate(s, &prefix, end.as_deref(), after, size, |value| {
                    if by_stock {
                        s.product(&String::from_utf8_lossy(value))
                    } else {
                        pb::Product::decode(value)
                            .map(Some)
                            .map_err(|e| StoreError::Corrupt {
                                key: "p".into(),
                                reason: e.to_string(),
                            })
                    }
                })
            })
            .await?;
        Ok(Response::new(pb::ListProductsResponse {
            products,
            next_page_token: next.map(|k| encode_token(&k, &filter)).unwrap_or_default(),
        }))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let (metadata, _, r) = request.into_parts();
        check_id("order_id", &r.order_id)?;
        let cut = cutoff(r.as_of_position, r.as_of_time.as_ref())?;
        self.wait_applied(&metadata, Self::wanted(r.min_position, cut))
            .await?;
        let id = r.order_id.clone();
        let found = match cut {
            None => match self.store.order(&id).map_err(store_failure)? {
                Some(order) => {
                    Some(Self::order_with_name(&self.store, order).map_err(store_failure)?)
                }
                None => None,
            },
            Some(cut) => {
                self.blocking(move |s| Self::order_as_of(s, &id, cut))
                    .await?
            }
        };
        found
            .map(Response::new)
            .ok_or_else(|| Self::not_found("order", &r.order_id, cut))
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        if !r.customer_id.is_empty() {
            check_id("customer_id", &r.customer_id)?;
        }
        let status = pb::OrderStatus::try_from(r.status)
            .map_err(|_| bad("status", format!("unknown order status {}", r.status)))?;
        self.wait_applied(&metadata, r.min_position).await?;
        let size = page_size(r.page_size);
        let filter = format!("orders|{}|{}", r.customer_id, r.status);
        let by_customer = !r.customer_id.is_empty();
        let prefix = if by_customer {
            store::orders_by_customer_prefix(&r.customer_id)
        } else if status != pb::OrderStatus::Unspecified {
            store::orders_by_status_prefix(status)
        } else {
            store::INDEX_ALL_ORDERS.to_vec()
        };
        let after = decode_token(&r.page_token, &filter, &prefix)?;
        let (orders, next) = self
            .blocking(move |s| {
                paginate(s, &prefix, None, after, size, |id| {
                    let Some(order) = s.order(&String::from_utf8_lossy(id))? else {
                        return Ok(None);
                    };
                    if by_customer
                        && status != pb::OrderStatus::Unspecified
                        && order.status() != status
                    {
                        return Ok(None);
                    }
                    Self::order_with_name(s, order).map(Some)
                })
            })
            .await?;
        Ok(Response::new(pb::ListOrdersResponse {
            orders,
            next_page_token: next.map(|k| encode_token(&k, &filter)).unwrap_or_default(),
        }))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        let stream = StreamId::parse(&r.stream_id).map_err(|e| bad("stream_id", e.to_string()))?;
        self.wait_applied(&metadata, r.min_position).await?;
        let from = r.from_version.max(1);
        let limit = history_limit(r.limit);
        let lookup = stream.clone();
        let events = self
            .blocking(move |s| s.history(&lookup, from, limit + 1))
            .await?;
        if events.is_empty() && from == 1 {
            return Err(Status::not_found(format!("stream {stream} has no events")));
        }
        let more = events.len() > limit;
        let event_desc = self
            .descriptors
            .get_message_by_name("shop.v1.Event")
            .ok_or_else(|| Status::internal("event descriptor missing"))?;
        let events: Vec<pb::HistoryEvent> = events
            .into_iter()
            .take(limit)
            .map(|e| history_event(&event_desc, e))
            .collect();
        let next_version = if more {
            events.last().map_or(0, |e| e.stream_version + 1)
        } else {
            0
        };
        Ok(Response::new(pb::GetHistoryResponse {
            events,
            next_version,
        }))
    }

    type WatchOrderStream = WatchStream<pb::Order>;

    async fn watch_order(
        &self,
        request: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let (metadata, _, r) = request.into_parts();
        check_id("order_id", &r.order_id)?;
        self.wait_applied(&metadata, r.min_position).await?;
        let (receiver, slot) = self.subscribe(WatchKey::Order(r.order_id.clone()))?;
        let id = r.order_id.clone();
        let current = self
            .blocking(move |s| match s.order(&id)? {
                Some(o) => Self::order_with_name(s, o).map(Some),
                None => Ok(None),
            })
            .await?
            .ok_or_else(|| Self::not_found("order", &r.order_id, None))?;
        let store = self.store.clone();
        let id = r.order_id;
        let stream = watch_stream(
            current,
            receiver,
            slot,
            |o| o.version,
            move |update| match update {
                Update::Order(o) => Some(o.clone()),
                Update::Customer(_) => None,
            },
            move || {
                store
                    .order(&id)
                    .ok()
                    .flatten()
                    .and_then(|o| Self::order_with_name(&store, o).ok())
            },
        );
        Ok(Response::new(stream))
    }

    type WatchCustomerStream = WatchStream<pb::Customer>;

    async fn watch_customer(
        &self,
        request: Request<pb::WatchCustomerRequest>,
    ) -> Result<Response<Self::WatchCustomerStream>, Status> {
        let (metadata, _, r) = request.into_parts();
        check_id("customer_id", &r.customer_id)?;
        self.wait_applied(&metadata, r.min_position).await?;
        let (receiver, slot) = self.subscribe(WatchKey::Customer(r.customer_id.clone()))?;
        let current = self
            .store
            .customer(&r.customer_id)
            .map_err(store_failure)?
            .ok_or_else(|| Self::not_found("customer", &r.customer_id, None))?;
        let store = self.store.clone();
        let id = r.customer_id;
        let stream = watch_stream(
            current,
            receiver,
            slot,
            |c| c.position,
            |update| match update {
                Update::Customer(c) => Some(c.clone()),
                Update::Order(_) => None,
            },
            move || store.customer(&id).ok().flatten(),
        );
        Ok(Response::new(stream))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::QueryStatus>, Status> {
        let freshness = self.status.freshness();
        Ok(Response::new(pb::QueryStatus {
            applied_position: freshness.applied,
            stream_last_sequence: freshness.stream_last,
            lag: freshness.lag,
            nats_connected: self.status.connected(),
            consumer_error: self.status.error().unwrap_or_default(),
            stream: self.stream.clone(),
            watchers: self.watchers.active() as u64,
        }))
    }
}

impl Queries {
    fn subscribe(
        &self,
        key: WatchKey,
    ) -> Result<(tokio::sync::broadcast::Receiver<Arc<Update>>, WatchSlot), Status> {
        self.watchers.subscribe(key).map_err(|e| match e {
            WatchError::TooMany(_) => {
                self.shed.inc();
                Status::resource_exhausted(e.to_string())
            }
            WatchError::Closed => Status::unavailable(e.to_string()),
        })
    }
}

/// A watch: the current view, then each newer change; after lagging, the latest state.
/// Ends with UNAVAILABLE when the server shuts down.
fn watch_stream<T: Clone + Send + Sync + 'static>(
    current: T,
    receiver: tokio::sync::broadcast::Receiver<Arc<Update>>,
    slot: WatchSlot,
    order_key: fn(&T) -> u64,
    pick: impl Fn(&Update) -> Option<T> + Send + 'static,
    reload: impl Fn() -> Option<T> + Send + 'static,
) -> WatchStream<T> {
    struct State<T, P, R> {
        first: Option<T>,
        last_key: u64,
        receiver: tokio::sync::broadcast::Receiver<Arc<Update>>,
        _slot: WatchSlot,
        pick: P,
        reload: R,
        done: bool,
    }
    let state = State {
        last_key: order_key(&current),
        first: Some(current),
        receiver,
        _slot: slot,
        pick,
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
                Ok(update) => (st.pick)(&update),
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
                let key = order_key(&view);
                if key > st.last_key {
                    st.last_key = key;
                    return Some((Ok(view), st));
                }
            }
        }
    }))
}
