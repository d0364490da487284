//! The machine's own ceilings, measured in the same run as the system, at the same
//! concurrency: a no-op tonic server, raw JetStream pipelined publish, raw ordered-consumer
//! read, raw sled durable group commit.

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use shop_shared::pb;
use tonic::{Request, Response, Status};

/// A ceiling figure.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub name: String,
    pub concurrency: usize,
    pub per_second: f64,
    pub detail: String,
}

// ---------------------------------------------------------------------------------------
// The echo server: the shop's own RPC shapes, answered without doing anything.

#[derive(Clone, Default)]
pub struct Echo {
    order: pb::Order,
}

impl Echo {
    pub fn new() -> Self {
        Echo {
            order: pb::Order {
                order_id: "echo".into(),
                customer_id: "bc1".into(),
                customer_name: "Bench Customer 1".into(),
                lines: (0..3)
                    .map(|i| pb::OrderLineView {
                        sku: format!("bp{i}"),
                        product_name: format!("Bench Product {i}"),
                        quantity: 2,
                        unit_price_cents: 100,
                    })
                    .collect(),
                total_cents: 600,
                status: pb::OrderStatus::Placed as i32,
                placed_at: Some(prost_types_now()),
                version: 1,
                position: 1,
                placed_position: 1,
                ..Default::default()
            },
        }
    }
}

fn prost_types_now() -> prost_types::Timestamp {
    shop_shared::events::timestamp_from_micros(shop_shared::events::now_micros())
}

fn echo_result() -> pb::CommandResult {
    pb::CommandResult {
        stream_id: "order-echo".into(),
        version: 1,
        position: 1,
        event_count: 1,
        id: "echo".into(),
    }
}

macro_rules! echo_commands {
    ($($method:ident($req:ty)),* $(,)?) => {
        #[tonic::async_trait]
        impl pb::command_service_server::CommandService for Echo {
            $(
                async fn $method(&self, _request: Request<$req>) -> Result<Response<pb::CommandResult>, Status> {
                    Ok(Response::new(echo_result()))
                }
            )*
        }
    };
}

echo_commands!(
    register_customer(pb::RegisterCustomerRequest),
    rename_customer(pb::RenameCustomerRequest),
    change_customer_address(pb::ChangeCustomerAddressRequest),
    delete_customer(pb::DeleteCustomerRequest),
    create_product(pb::CreateProductRequest),
    restock_product(pb::RestockProductRequest),
    change_product_price(pb::ChangeProductPriceRequest),
    place_order(pb::PlaceOrderRequest),
    pay_order(pb::PayOrderRequest),
    ship_order(pb::ShipOrderRequest),
    cancel_order(pb::CancelOrderRequest),
    create_shipment(pb::CreateShipmentRequest),
    record_shipment_event(pb::RecordShipmentEventRequest),
);

type Never<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::query_service_server::QueryService for Echo {
    async fn get_customer(
        &self,
        _r: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_customers(
        &self,
        _r: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_product(
        &self,
        _r: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_products(
        &self,
        _r: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_order(
        &self,
        _r: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        Ok(Response::new(self.order.clone()))
    }
    async fn list_orders(
        &self,
        _r: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_shipment(
        &self,
        _r: Request<pb::GetShipmentRequest>,
    ) -> Result<Response<pb::Shipment>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_history(
        &self,
        _r: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type WatchOrderStream = Never<pb::Order>;
    async fn watch_order(
        &self,
        _r: Request<pb::WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type WatchCustomerStream = Never<pb::Customer>;
    async fn watch_customer(
        &self,
        _r: Request<pb::WatchCustomerRequest>,
    ) -> Result<Response<Self::WatchCustomerStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_status(
        &self,
        _r: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::QueryStatus>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// Serves the echo services on `listen` (the `echo-server` subcommand, run as its own
/// process like the real servers, with the same multi-threaded runtime and no-delay TCP).
pub async fn serve_echo(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let echo = Echo::new();
    tonic::transport::Server::builder()
        .add_service(pb::command_service_server::CommandServiceServer::new(
            echo.clone(),
        ))
        .add_service(pb::query_service_server::QueryServiceServer::new(echo))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Raw JetStream: pipelined publish to a scratch stream, ordered-consumer read.

/// Publishes `size`-byte messages (with headers like the relay's) to a scratch stream for
/// `duration`, `window` in flight, acks checked in order.
pub async fn jetstream_publish(
    nats_url: &str,
    size: usize,
    duration: Duration,
    window: usize,
) -> anyhow::Result<Ceiling> {
    use async_nats::jetstream;
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client.clone());
    let name = "BENCH_SCRATCH";
    let _ = js.delete_stream(name).await;
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec!["bench.scratch.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![0x5a; size]);
    let mut inflight = VecDeque::with_capacity(window);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    while start.elapsed() < duration {
        for _ in 0..256 {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Expected-Last-Sequence", sent.to_string().as_str());
            headers.insert("Shop-Event-Id", "01a20c0a-9a60-7533-a145-6b9a7bc61152");
            headers.insert("Shop-Event-Type", "StockReserved");
            headers.insert("Shop-Position", (sent + 1).to_string().as_str());
            headers.insert(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            );
            let ack = js
                .publish_with_headers(
                    format!("bench.scratch.{}", sent % 64),
                    headers,
                    payload.clone(),
                )
                .await?;
            inflight.push_back(ack);
            sent += 1;
            if inflight.len() >= window {
                if let Some(a) = inflight.pop_front() {
                    a.await?;
                    acked += 1;
                }
            }
        }
    }
    while let Some(a) = inflight.pop_front() {
        a.await?;
        acked += 1;
    }
    let elapsed = start.elapsed();
    let _ = js.delete_stream(name).await;
    Ok(Ceiling {
        name: "raw JetStream publish".into(),
        concurrency: window,
        per_second: acked as f64 / elapsed.as_secs_f64(),
        detail: format!("{acked} messages of {size} B with 5 headers, {window} in flight, expected-last-sequence checked"),
    })
}

/// Reads the whole event stream with an ordered consumer.
pub async fn ordered_consumer_read(nats_url: &str, stream: &str) -> anyhow::Result<Ceiling> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    let client = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(stream).await?;
    let last = s.info().await?.state.last_sequence;
    let consumer = s
        .create_consumer(OrderedConfig {
            max_batch: 2000,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let start = Instant::now();
    let mut n = 0u64;
    let mut bytes = 0u64;
    while n < last {
        match messages.next().await {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload.len() as u64;
            }
            _ => break,
        }
    }
    let elapsed = start.elapsed();
    Ok(Ceiling {
        name: "raw ordered-consumer read".into(),
        concurrency: 1,
        per_second: n as f64 / elapsed.as_secs_f64(),
        detail: format!("{n} events ({} B average) of {stream}", bytes / n.max(1)),
    })
}

// ---------------------------------------------------------------------------------------
// Raw sled: durable group-commit appends.

/// `concurrency` writers each append a `size`-byte record and wait until it is durable;
/// one flusher thread applies everything pending as one batch, then flush + fdatasync
/// (the command server's durability, without its decisions).
pub fn sled_group_commit(
    dir: &Path,
    size: usize,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Ceiling> {
    use std::sync::mpsc;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(64 << 20)
        .flush_every_ms(None)
        .open()?;
    let data = File::open(dir.join("db"))?;
    let (tx, rx) = mpsc::sync_channel::<(u64, mpsc::SyncSender<()>)>(concurrency * 2);
    let stop_at = Instant::now() + duration;
    let flusher = {
        let db = db.clone();
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let value = vec![0xa5u8; size];
            let mut durable = 0u64;
            while let Ok(first) = rx.recv() {
                let mut pending = vec![first];
                while let Ok(more) = rx.try_recv() {
                    pending.push(more);
                }
                let mut batch = sled::Batch::default();
                for (key, _) in &pending {
                    batch.insert(&key.to_be_bytes(), value.as_slice());
                }
                db.apply_batch(batch)?;
                db.flush()?;
                data.sync_data()?;
                durable += pending.len() as u64;
                for (_, done) in pending {
                    let _ = done.send(());
                }
            }
            Ok(durable)
        })
    };
    let next_key = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let writers: Vec<_> = (0..concurrency)
        .map(|_| {
            let tx = tx.clone();
            let next_key = next_key.clone();
            std::thread::spawn(move || {
                let (done_tx, done_rx) = mpsc::sync_channel(1);
                while Instant::now() < stop_at {
                    let key = next_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if tx.send((key, done_tx.clone())).is_err() || done_rx.recv().is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    for w in writers {
        let _ = w.join();
    }
    let durable = flusher
        .join()
        .map_err(|_| anyhow::anyhow!("flusher panicked"))??;
    let elapsed = start.elapsed();
    Ok(Ceiling {
        name: "raw sled group commit".into(),
        concurrency,
        per_second: durable as f64 / elapsed.as_secs_f64(),
        detail: format!("{durable} records of {size} B, flush + fdatasync per group"),
    })
}
