//! `shop.v1.QueryService`: the handlers. Each parses and checks its request, waits for
//! `min_position`, and reads through one generic path per concern: point and as-of reads
//! ([`Queries::get`], `as_of.rs`), lists (`paging.rs` over an index a view declares),
//! history (`history.rs`), watches ([`Queries::watch`], `watchers.rs`).
//!
//! - Every Get/List first waits until the consumer has applied `min_position` (a watch
//!   channel, no polling), bounded by the request deadline (5 s without one); otherwise
//!   UNAVAILABLE saying how far behind the server is.
//! - Lists, as-of folds, history and watches read on the blocking pool (a scan can wait
//!   for sled's global lock while the consumer applies a batch); a point Get reads where
//!   it is asked (see [`Queries::get`] for why).
//! - Every response carries `shop-applied-position` and `shop-lag-events` metadata, added
//!   by [`crate::freshness::FreshnessLayer`] once the handler has read.
//! - Errors are [`QueryError`]s; `error.rs` decides their statuses.

use std::sync::Arc;
use std::time::Duration;

use shop_shared::grpc::request_timeout;
use shop_shared::ids::{validate_id, StreamId};
use shop_shared::pb;
use shop_shared::pb::query_service_server::QueryService;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use prometheus_client::metrics::counter::Counter;

use crate::as_of::{cutoff, read_as_of, Cutoff};
use crate::consumer::ConsumerStatus;
use crate::error::QueryError;
use crate::history::{history_event, history_limit};
use crate::paging::{decode_token, encode_token, page_size, paginate};
use crate::projections::{customers, orders, products, View, ViewKey};
use crate::store::{Store, StoreError};
use crate::watchers::{watch_stream, WatchError, WatchStream, Watchers};

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

fn check_id(field: &str, id: &str) -> Result<(), QueryError> {
    validate_id(id)
        .map_err(|e| QueryError::bad(field, format!("{e} (ids match [A-Za-z0-9_-]{{1,64}})")))
}

/// What a Get request asks for.
struct GetRequest<'r> {
    id: &'r str,
    min_position: u64,
    as_of_position: u64,
    as_of_time: Option<&'r prost_types::Timestamp>,
}

impl Queries {
    /// Waits until `min_position` is applied, within the request's deadline.
    async fn wait_applied(
        &self,
        metadata: &MetadataMap,
        min_position: u64,
    ) -> Result<(), QueryError> {
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
            _ => Err(QueryError::NotApplied {
                applied: self.status.applied(),
                wanted: min_position,
                waited_ms: wait.as_millis(),
                consumer: self.status.error(),
            }),
        }
    }

    /// Runs a store read on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, QueryError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(|_| QueryError::Internal("a store read panicked"))?
            .map_err(QueryError::from)
    }

    /// A Get: the view now, or as of a past position or time.
    async fn get<V: View>(
        &self,
        metadata: &MetadataMap,
        r: GetRequest<'_>,
    ) -> Result<Response<V>, Status> {
        check_id(V::ID_FIELD, r.id)?;
        let cut = cutoff(r.as_of_position, r.as_of_time)?;
        // An as-of position must be applied too.
        let wanted = match cut {
            Some(Cutoff::Position(p)) => r.min_position.max(p),
            _ => r.min_position,
        };
        self.wait_applied(metadata, wanted).await?;
        let found = match cut {
            // A point read is one or two sled gets (a few µs), run where it is asked:
            // handing it to the blocking pool cost more than the read itself (GetOrder at
            // 64 clients: 14–20k/s instead of 22–35k/s, docs/benchmarks/architecture.md).
            // The price: while the consumer applies a batch, sled's lock can hold this
            // worker for as long (issue: reads that never wait behind writes).
            None => self.store.joined::<V>(r.id).map_err(QueryError::from)?,
            Some(cut) => {
                let id = r.id.to_string();
                self.blocking(move |s| read_as_of::<V>(s, &id, cut)).await?
            }
        };
        found
            .map(Response::new)
            .ok_or_else(|| QueryError::not_found::<V>(r.id, cut).into())
    }

    /// A watch: subscribe first, then read the current view, so no change falls between.
    async fn watch<V: View>(
        &self,
        metadata: &MetadataMap,
        id: &str,
        min_position: u64,
    ) -> Result<Response<WatchStream<V>>, Status> {
        check_id(V::ID_FIELD, id)?;
        self.wait_applied(metadata, min_position).await?;
        let (receiver, slot) =
            self.watchers
                .subscribe(ViewKey::of::<V>(id))
                .map_err(|e| match e {
                    WatchError::TooMany(max) => {
                        self.shed.inc();
                        QueryError::TooManyWatchers(max)
                    }
                    WatchError::Closed => QueryError::ShuttingDown,
                })?;
        let owned = id.to_string();
        let current = self
            .blocking(move |s| s.joined::<V>(&owned))
            .await?
            .ok_or_else(|| QueryError::not_found::<V>(id, None))?;
        let store = self.store.clone();
        let id = id.to_string();
        let reload = move || store.joined::<V>(&id).ok().flatten();
        Ok(Response::new(watch_stream(current, receiver, slot, reload)))
    }
}

#[tonic::async_trait]
impl QueryService for Queries {
    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let (metadata, _, r) = request.into_parts();
        let get = GetRequest {
            id: &r.customer_id,
            min_position: r.min_position,
            as_of_position: r.as_of_position,
            as_of_time: r.as_of_time.as_ref(),
        };
        self.get(&metadata, get).await
    }

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let (metadata, _, r) = request.into_parts();
        if r.name_prefix.chars().count() > 200 {
            return Err(QueryError::bad("name_prefix", "must be at most 200 characters").into());
        }
        self.wait_applied(&metadata, r.min_position).await?;
        let prefix = customers::by_name_prefix(&r.name_prefix);
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
                paginate(s, &prefix, None, after, size, |key, id| {
                    let c = s.listed::<pb::Customer>(key, id)?;
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
        let get = GetRequest {
            id: &r.sku,
            min_position: r.min_position,
            as_of_position: r.as_of_position,
            as_of_time: r.as_of_time.as_ref(),
        };
        self.get(&metadata, get).await
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
                products::BY_AVAILABLE.to_vec(),
                Some(products::by_available_end(max)),
                format!("products|max_available={max}"),
            ),
            None => (
                Store::rows_prefix::<pb::Product>(),
                None,
                "products|all".to_string(),
            ),
        };
        let after = decode_token(&r.page_token, &filter, &prefix)?;
        let by_stock = r.max_available.is_some();
        let (products, next) = self
            .blocking(move |s| {
                paginate(s, &prefix, end.as_deref(), after, size, |key, value| {
                    if by_stock {
                        s.listed::<pb::Product>(key, value)
                    } else {
                        Store::decode_row::<pb::Product>(value).map(Some)
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
        let get = GetRequest {
            id: &r.order_id,
            min_position: r.min_position,
            as_of_position: r.as_of_position,
            as_of_time: r.as_of_time.as_ref(),
        };
        self.get(&metadata, get).await
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
            .map_err(|_| QueryError::bad("status", format!("unknown order status {}", r.status)))?;
        self.wait_applied(&metadata, r.min_position).await?;
        let size = page_size(r.page_size);
        let filter = format!("orders|{}|{}", r.customer_id, r.status);
        let by_customer = !r.customer_id.is_empty();
        let prefix = if by_customer {
            orders::by_customer_prefix(&r.customer_id)
        } else if status != pb::OrderStatus::Unspecified {
            orders::by_status_prefix(status)
        } else {
            orders::ALL.to_vec()
        };
        let after = decode_token(&r.page_token, &filter, &prefix)?;
        let (orders, next) = self
            .blocking(move |s| {
                paginate(s, &prefix, None, after, size, |key, id| {
                    let Some(order) = s.listed::<pb::Order>(key, id)? else {
                        return Ok(None);
                    };
                    if by_customer
                        && status != pb::OrderStatus::Unspecified
                        && order.status() != status
                    {
                        return Ok(None);
                    }
                    Ok(Some(order))
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
        let stream = StreamId::parse(&r.stream_id)
            .map_err(|e| QueryError::bad("stream_id", e.to_string()))?;
        self.wait_applied(&metadata, r.min_position).await?;
        let from = r.from_version.max(1);
        let limit = history_limit(r.limit);
        let lookup = stream.clone();
        let events = self
            .blocking(move |s| s.history(&lookup, from, limit + 1))
            .await?;
        if events.is_empty() && from == 1 {
            return Err(QueryError::StreamNotFound(stream.to_string()).into());
        }
        let more = events.len() > limit;
        let event_desc = self
            .descriptors
            .get_message_by_name("shop.v1.Event")
            .ok_or(QueryError::Internal(
                "the shop.v1.Event descriptor is missing",
            ))?;
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
        self.watch(&metadata, &r.order_id, r.min_position).await
    }

    type WatchCustomerStream = WatchStream<pb::Customer>;

    async fn watch_customer(
        &self,
        request: Request<pb::WatchCustomerRequest>,
    ) -> Result<Response<Self::WatchCustomerStream>, Status> {
        let (metadata, _, r) = request.into_parts();
        self.watch(&metadata, &r.customer_id, r.min_position).await
    }

    async fn get_shipment(
        &self,
        request: Request<pb::GetShipmentRequest>,
    ) -> Result<Response<pb::Shipment>, Status> {
        let (metadata, _, r) = request.into_parts();
        let get = GetRequest {
            id: &r.shipment_id,
            min_position: r.min_position,
            as_of_position: r.as_of_position,
            as_of_time: r.as_of_time.as_ref(),
        };
        self.get(&metadata, get).await
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
