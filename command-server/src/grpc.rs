//! The tonic adapter: protobuf requests → validated domain commands → the writer, and
//! every refusal → a gRPC status, decided in one place ([`status_of`]).
//!
//! Also serves `shop.v1.LogService`: read access to the durable log and the relay's
//! progress, for operators and tests.

use std::sync::Arc;

use prost::Message;
use shop_shared::auth::Principal;
use shop_shared::grpc::{invalid_argument, storage_unavailable, with_reason, FieldViolation};
use shop_shared::ids::{generate_id, StreamId};
use shop_shared::metrics::code_name;
use shop_shared::pb;
use shop_shared::pb::command_service_server::CommandService;
use shop_shared::pb::log_service_server::LogService;
use shop_shared::telemetry::RequestTrace;
use tonic::{Code, Request, Response, Status};

use crate::domain::{Command, DomainError, LineRequest};
use crate::failover::Role;
use crate::log::{EventLog, READ_LIMIT_MAX};
use crate::metrics::{positions, CommandMetrics};
use crate::relay::RelayStatus;
use crate::writer::{CommandMeta, WriteError, Writer, WriterWatch};

/// Longest client-supplied command id.
pub const COMMAND_ID_LEN_MAX: usize = 128;
/// Response header set on idempotent replays.
pub const REPLAYED_HEADER: &str = "shop-replayed";
/// Request header carrying a caller's correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// `shop.v1.CommandService`.
#[derive(Clone)]
pub struct Commands {
    pub writer: Writer,
    /// Commands by outcome, and queue-full refusals as shed requests.
    pub metrics: CommandMetrics,
    /// `--ack replicated`: answers wait for the stream.
    pub replication: Option<Replication>,
    /// Whether this server is the writer (a standby refuses commands: NOT_LEADER).
    pub role: tokio::sync::watch::Receiver<Role>,
}

/// What `--ack replicated` waits for: the relay's stream acknowledgements.
#[derive(Clone)]
pub struct Replication {
    pub relay: Arc<RelayStatus>,
    pub timeout: std::time::Duration,
}

/// Fields every command request has.
trait CommandRequest: Message + Clone + Default + 'static {
    const RPC: &'static str;
    fn command_id(&self) -> &str;
    fn clear_command_id(&mut self);
    fn expected_version(&self) -> Option<u64>;
    /// The domain command, with a generated id where the request may omit one.
    fn to_command(&self) -> Command;
}

macro_rules! command_request {
    ($ty:ty, $rpc:literal, |$r:ident| $to_command:expr) => {
        impl CommandRequest for $ty {
            const RPC: &'static str = $rpc;
            fn command_id(&self) -> &str {
                &self.command_id
            }
            fn clear_command_id(&mut self) {
                self.command_id.clear();
            }
            fn expected_version(&self) -> Option<u64> {
                self.expected_version
            }
            fn to_command(&self) -> Command {
                let $r = self;
                $to_command
            }
        }
    };
}

/// A client-chosen id, or a generated one when the request left it empty.
fn or_generated(id: &str) -> String {
    if id.is_empty() {
        generate_id()
    } else {
        id.to_string()
    }
}

command_request!(pb::RegisterCustomerRequest, "RegisterCustomer", |r| {
    Command::RegisterCustomer {
        customer_id: or_generated(&r.customer_id),
        name: r.name.clone(),
        email: r.email.clone(),
        address: r.address.clone(),
    }
});
command_request!(pb::RenameCustomerRequest, "RenameCustomer", |r| {
    Command::RenameCustomer {
        customer_id: r.customer_id.clone(),
        name: r.name.clone(),
    }
});
command_request!(
    pb::ChangeCustomerAddressRequest,
    "ChangeCustomerAddress",
    |r| {
        Command::ChangeCustomerAddress {
            customer_id: r.customer_id.clone(),
            address: r.address.clone(),
        }
    }
);
command_request!(pb::DeleteCustomerRequest, "DeleteCustomer", |r| {
    Command::DeleteCustomer {
        customer_id: r.customer_id.clone(),
        reason: r.reason.clone(),
    }
});
command_request!(pb::CreateProductRequest, "CreateProduct", |r| {
    Command::CreateProduct {
        sku: r.sku.clone(),
        name: r.name.clone(),
        price_cents: r.price_cents,
        initial_stock: r.initial_stock,
    }
});
command_request!(pb::RestockProductRequest, "RestockProduct", |r| {
    Command::RestockProduct {
        sku: r.sku.clone(),
        quantity: r.quantity,
    }
});
command_request!(pb::ChangeProductPriceRequest, "ChangeProductPrice", |r| {
    Command::ChangeProductPrice {
        sku: r.sku.clone(),
        price_cents: r.price_cents,
    }
});
command_request!(pb::PlaceOrderRequest, "PlaceOrder", |r| {
    Command::PlaceOrder {
        order_id: or_generated(&r.order_id),
        customer_id: r.customer_id.clone(),
        lines: r
            .lines
            .iter()
            .map(|l| LineRequest {
                sku: l.sku.clone(),
                quantity: l.quantity,
            })
            .collect(),
    }
});
command_request!(pb::PayOrderRequest, "PayOrder", |r| Command::PayOrder {
    order_id: r.order_id.clone(),
    amount_cents: r.amount_cents,
    payment_ref: r.payment_ref.clone(),
});
command_request!(pb::ShipOrderRequest, "ShipOrder", |r| Command::ShipOrder {
    order_id: r.order_id.clone(),
    tracking: r.tracking.clone(),
});
command_request!(pb::CancelOrderRequest, "CancelOrder", |r| {
    Command::CancelOrder {
        order_id: r.order_id.clone(),
        reason: r.reason.clone(),
    }
});
command_request!(pb::CreateShipmentRequest, "CreateShipment", |r| {
    Command::CreateShipment {
        shipment_id: or_generated(&r.shipment_id),
        order_id: r.order_id.clone(),
        carrier: r.carrier.clone(),
        tracking_code: r.tracking_code.clone(),
    }
});
command_request!(pb::RecordShipmentEventRequest, "RecordShipmentEvent", |r| {
    Command::RecordShipmentEvent {
        shipment_id: r.shipment_id.clone(),
        // An unknown value is refused by validation, naming `status`.
        status: pb::ShipmentStatus::try_from(r.status).unwrap_or_default(),
        location: r.location.clone(),
        note: r.note.clone(),
    }
});

impl Commands {
    /// Runs one command and counts its outcome.
    async fn execute<R: CommandRequest>(
        &self,
        request: Request<R>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        let answer = self.run(request).await;
        let outcome = match &answer {
            Ok(response) if response.metadata().contains_key(REPLAYED_HEADER) => "Replayed",
            Ok(_) => "OK",
            Err(status) => code_name(status.code()),
        };
        self.metrics.command(R::RPC, outcome);
        answer
    }

    async fn run<R: CommandRequest>(
        &self,
        request: Request<R>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        let correlation = correlation_id(request.metadata());
        let traceparent = request
            .extensions()
            .get::<RequestTrace>()
            .and_then(|t| t.propagate.clone());
        let actor = request
            .extensions()
            .get::<Principal>()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let request = request.into_inner();
        if let Role::Standby { leader } = &*self.role.borrow() {
            return Err(not_leader(leader.as_deref()));
        }
        // Under overload, refuse before any work.
        if let Err(overloaded) = self.writer.admitting() {
            self.metrics.shed();
            return Err(status_of(&overloaded));
        }
        let command = admit(&request)?;

        let mut unkeyed = request.clone();
        unkeyed.clear_command_id();
        let client_id = Some(request.command_id()).filter(|id| !id.is_empty());
        let mut meta = CommandMeta::for_request(
            R::RPC,
            &unkeyed.encode_to_vec(),
            client_id.map(str::to_string),
        );
        meta.expected_version = request.expected_version();
        if let Some(correlation) = correlation {
            meta.correlation_id = correlation;
        }
        meta.traceparent = traceparent;
        meta.actor = actor;
        let outcome = self.writer.submit(command, meta).await;
        let outcome = match (outcome, &self.replication) {
            (Ok(accepted), Some(replication)) => {
                // Accepted now or before (a replay): answered only once the stream holds
                // the command's events. Refusals wrote nothing and are answered at once.
                let position = accepted.result.position;
                if replication
                    .relay
                    .wait_published(position, replication.timeout)
                    .await
                {
                    Ok(accepted)
                } else {
                    return Err(not_replicated(position, replication.timeout));
                }
            }
            (outcome, _) => outcome,
        };
        match outcome {
            Ok(accepted) => {
                let mut response = Response::new(accepted.result);
                if accepted.replayed {
                    response.metadata_mut().insert(
                        REPLAYED_HEADER,
                        tonic::metadata::MetadataValue::from_static("true"),
                    );
                }
                Ok(response)
            }
            Err(error) => {
                if error.is_overload() {
                    self.metrics.shed();
                }
                Err(status_of(&error))
            }
        }
    }
}

/// A command sent to a standby: the writer's address, when known, is in the metadata.
fn not_leader(leader: Option<&str>) -> Status {
    let message = match leader {
        Some(addr) => format!("this command server is a standby; the writer is {addr}: send commands there"),
        None => "this command server is a standby and knows no writer yet (NATS unreachable, or a takeover under way): retry shortly".to_string(),
    };
    with_reason(
        Code::Unavailable,
        "NOT_LEADER",
        message,
        &[("leader", leader.unwrap_or_default().to_string())],
    )
}

/// A command whose events the stream did not acknowledge in time (`--ack replicated`).
fn not_replicated(position: u64, timeout: std::time::Duration) -> Status {
    with_reason(
        Code::Unavailable,
        "NOT_REPLICATED",
        format!(
            "the command's events are in this server's log but the stream did not acknowledge them within {} ms; the command is not acknowledged: retry with the same command_id",
            timeout.as_millis()
        ),
        &[("position", position.to_string())],
    )
}

/// The validated domain command of a request, or INVALID_ARGUMENT naming every bad field.
fn admit<R: CommandRequest>(request: &R) -> Result<Command, Status> {
    let command = request.to_command();
    let mut violations = match command.validate() {
        Ok(()) => Vec::new(),
        Err(DomainError::Invalid(v)) => v,
        Err(other) => return Err(status_of(&WriteError::Domain(other))),
    };
    if let Err(why) = check_command_id(request.command_id()) {
        violations.insert(0, FieldViolation::new("command_id", why));
    }
    if !violations.is_empty() {
        return Err(invalid_argument(&violations));
    }
    Ok(command)
}

/// The command RPCs, in the order [`admit_encoded`] numbers them.
pub const COMMAND_RPCS: [&str; 13] = [
    "RegisterCustomer",
    "RenameCustomer",
    "ChangeCustomerAddress",
    "DeleteCustomer",
    "CreateProduct",
    "RestockProduct",
    "ChangeProductPrice",
    "PlaceOrder",
    "PayOrder",
    "ShipOrder",
    "CancelOrder",
    "CreateShipment",
    "RecordShipmentEvent",
];

/// Decodes `body` as the request of RPC number `rpc` of [`COMMAND_RPCS`] and admits it as
/// the server does before the writer sees it: the domain command, or the status a client
/// gets. Decoding failures are INVALID_ARGUMENT here (tonic answers INTERNAL before a
/// handler runs). For the fuzz targets (`fuzz/`) and their corpus replay.
pub fn admit_encoded(rpc: usize, body: &[u8]) -> Result<Command, Status> {
    fn decoded<R: CommandRequest>(body: &[u8]) -> Result<Command, Status> {
        let request = R::decode(body)
            .map_err(|e| Status::invalid_argument(format!("not a {} request: {e}", R::RPC)))?;
        admit(&request)
    }
    match rpc % COMMAND_RPCS.len() {
        0 => decoded::<pb::RegisterCustomerRequest>(body),
        1 => decoded::<pb::RenameCustomerRequest>(body),
        2 => decoded::<pb::ChangeCustomerAddressRequest>(body),
        3 => decoded::<pb::DeleteCustomerRequest>(body),
        4 => decoded::<pb::CreateProductRequest>(body),
        5 => decoded::<pb::RestockProductRequest>(body),
        6 => decoded::<pb::ChangeProductPriceRequest>(body),
        7 => decoded::<pb::PlaceOrderRequest>(body),
        8 => decoded::<pb::PayOrderRequest>(body),
        9 => decoded::<pb::ShipOrderRequest>(body),
        10 => decoded::<pb::CancelOrderRequest>(body),
        11 => decoded::<pb::CreateShipmentRequest>(body),
        _ => decoded::<pb::RecordShipmentEventRequest>(body),
    }
}

/// Client command ids: 1..=128 printable ASCII characters (no spaces).
fn check_command_id(id: &str) -> Result<(), String> {
    if id.len() > COMMAND_ID_LEN_MAX {
        return Err(format!("must be at most {COMMAND_ID_LEN_MAX} characters"));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// The caller's correlation id: `x-correlation-id`, else the trace id of a W3C
/// `traceparent`.
fn correlation_id(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    if let Some(id) = metadata
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        if !id.is_empty()
            && id.len() <= COMMAND_ID_LEN_MAX
            && id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Some(id.to_string());
        }
    }
    metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(shop_shared::subjects::trace_id_of_traceparent)
        .map(str::to_string)
}

/// The one place that decides which gRPC status a refusal becomes (the codes: README, The API). The
/// ErrorInfo reason and metadata carry what a program needs; the message is for people.
pub fn status_of(error: &WriteError) -> Status {
    use Code::*;
    let message = error.to_string();
    let reason = |code, reason: &str, metadata: &[(&str, String)]| {
        with_reason(code, reason, message.clone(), metadata)
    };
    match error {
        WriteError::Domain(domain) => domain_status(domain, message),
        WriteError::VersionConflict {
            stream,
            expected,
            actual,
        } => reason(
            Aborted,
            "VERSION_CONFLICT",
            &[
                ("stream_id", stream.clone()),
                ("expected_version", expected.to_string()),
                ("actual_version", actual.to_string()),
            ],
        ),
        WriteError::CommandIdReused(id) => reason(
            AlreadyExists,
            "COMMAND_ID_REUSED",
            &[("command_id", id.clone())],
        ),
        WriteError::Overloaded(capacity) => reason(
            ResourceExhausted,
            "OVERLOADED",
            &[("queue_capacity", capacity.to_string())],
        ),
        WriteError::QueueWait(ms) => reason(
            ResourceExhausted,
            "OVERLOADED",
            &[("queue_wait_max_ms", ms.to_string())],
        ),
        WriteError::Invariant(_) => reason(Internal, "INVARIANT_VIOLATED", &[]),
        WriteError::ShuttingDown => Status::unavailable(message),
        WriteError::DiskFull(detail) => {
            tracing::error!(%detail, "command refused: the disk under the event log is full");
            with_reason(
                Code::ResourceExhausted,
                "DISK_FULL",
                "the disk under the event log is full; the command was not acknowledged. \
                 The server resumes by itself once space is freed; retry later"
                    .to_string(),
                &[("cause", detail.clone())],
            )
        }
        WriteError::Storage(detail) => {
            tracing::error!(%detail, "command refused: event log unusable");
            storage_unavailable("the event log is unavailable; the command was not acknowledged")
        }
    }
}

/// The status of a domain refusal (part of [`status_of`]).
fn domain_status(error: &DomainError, message: String) -> Status {
    use Code::*;
    let reason = |code, reason: &str, metadata: &[(&str, String)]| {
        with_reason(code, reason, message.clone(), metadata)
    };
    match error {
        DomainError::Invalid(violations) => invalid_argument(violations),
        DomainError::CustomerNotFound(id) => reason(
            NotFound,
            "CUSTOMER_NOT_FOUND",
            &[("customer_id", id.clone())],
        ),
        DomainError::ProductNotFound(sku) => {
            reason(NotFound, "PRODUCT_NOT_FOUND", &[("sku", sku.clone())])
        }
        DomainError::OrderNotFound(id) => {
            reason(NotFound, "ORDER_NOT_FOUND", &[("order_id", id.clone())])
        }
        DomainError::CustomerExists(id) => reason(
            AlreadyExists,
            "CUSTOMER_EXISTS",
            &[("customer_id", id.clone())],
        ),
        DomainError::ProductExists(sku) => {
            reason(AlreadyExists, "PRODUCT_EXISTS", &[("sku", sku.clone())])
        }
        DomainError::ShipmentNotFound(id) => reason(
            NotFound,
            "SHIPMENT_NOT_FOUND",
            &[("shipment_id", id.clone())],
        ),
        DomainError::ShipmentExists(id) => reason(
            AlreadyExists,
            "SHIPMENT_EXISTS",
            &[("shipment_id", id.clone())],
        ),
        DomainError::OrderHasShipment {
            order_id,
            shipment_id,
        } => reason(
            AlreadyExists,
            "ORDER_HAS_SHIPMENT",
            &[
                ("order_id", order_id.clone()),
                ("shipment_id", shipment_id.clone()),
            ],
        ),
        DomainError::OrderExists(id) => {
            reason(AlreadyExists, "ORDER_EXISTS", &[("order_id", id.clone())])
        }
        DomainError::EmailTaken { customer_id, .. } => reason(
            AlreadyExists,
            "EMAIL_TAKEN",
            &[
                ("field", "email".into()),
                ("customer_id", customer_id.clone()),
            ],
        ),
        _ => precondition_status(error, message),
    }
}

/// The status of a refusal for a failed precondition (part of [`status_of`]).
fn precondition_status(error: &DomainError, message: String) -> Status {
    let reason = |reason: &str, metadata: &[(&str, String)]| {
        with_reason(Code::FailedPrecondition, reason, message.clone(), metadata)
    };
    match error {
        DomainError::CustomerDeleted(id) => {
            reason("CUSTOMER_DELETED", &[("customer_id", id.clone())])
        }
        DomainError::InsufficientStock {
            sku,
            requested,
            available,
        } => reason(
            "INSUFFICIENT_STOCK",
            &[
                ("sku", sku.clone()),
                ("requested", requested.to_string()),
                ("available", available.to_string()),
            ],
        ),
        DomainError::InvalidOrderState {
            order_id, status, ..
        } => reason(
            "INVALID_ORDER_STATE",
            &[
                ("order_id", order_id.clone()),
                ("status", (*status).to_string()),
            ],
        ),
        DomainError::AmountMismatch {
            amount_cents,
            total_cents,
        } => reason(
            "AMOUNT_MISMATCH",
            &[
                ("amount_cents", amount_cents.to_string()),
                ("total_cents", total_cents.to_string()),
            ],
        ),
        DomainError::StockLimit { sku, .. } => reason("STOCK_LIMIT", &[("sku", sku.clone())]),
        DomainError::ShipmentDelivered(id) => {
            reason("SHIPMENT_DELIVERED", &[("shipment_id", id.clone())])
        }
        DomainError::TrackingLimit(id) => reason("TRACKING_LIMIT", &[("shipment_id", id.clone())]),
        other => {
            debug_assert!(false, "not a precondition: {other:?}");
            Status::internal("unexpected refusal")
        }
    }
}

#[tonic::async_trait]
impl CommandService for Commands {
    async fn register_customer(
        &self,
        request: Request<pb::RegisterCustomerRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn rename_customer(
        &self,
        request: Request<pb::RenameCustomerRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn change_customer_address(
        &self,
        request: Request<pb::ChangeCustomerAddressRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn delete_customer(
        &self,
        request: Request<pb::DeleteCustomerRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn restock_product(
        &self,
        request: Request<pb::RestockProductRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn change_product_price(
        &self,
        request: Request<pb::ChangeProductPriceRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn place_order(
        &self,
        request: Request<pb::PlaceOrderRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn pay_order(
        &self,
        request: Request<pb::PayOrderRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn ship_order(
        &self,
        request: Request<pb::ShipOrderRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn create_shipment(
        &self,
        request: Request<pb::CreateShipmentRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }

    async fn record_shipment_event(
        &self,
        request: Request<pb::RecordShipmentEventRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        self.execute(request).await
    }
}

/// `shop.v1.LogService`.
#[derive(Clone)]
pub struct LogReader {
    pub log: Arc<EventLog>,
    pub watch: WriterWatch,
    pub relay: Arc<RelayStatus>,
    pub stream: String,
    pub role: tokio::sync::watch::Receiver<Role>,
    /// This server's advertised address (the leader's, when it is the writer).
    pub advertised: String,
}

/// Default number of events per read.
const READ_LIMIT_DEFAULT: usize = 100;

fn read_limit(limit: u32) -> usize {
    match usize::try_from(limit) {
        Ok(0) | Err(_) => READ_LIMIT_DEFAULT,
        Ok(n) => n.min(READ_LIMIT_MAX),
    }
}

fn decode_all(rows: Vec<(u64, bytes::Bytes)>) -> Result<Vec<pb::EventEnvelope>, Status> {
    rows.into_iter()
        .map(|(position, bytes)| {
            crate::log::decode_envelope(position, &bytes).map_err(|e| {
                tracing::error!(error = %e, "undecodable event in the log");
                Status::internal("the log holds an undecodable event")
            })
        })
        .collect()
}

fn log_failure(error: impl std::fmt::Display) -> Status {
    tracing::error!(%error, "log read failed");
    Status::unavailable("the event log cannot be read")
}

#[tonic::async_trait]
impl LogService for LogReader {
    async fn get_log_status(
        &self,
        _request: Request<pb::GetLogStatusRequest>,
    ) -> Result<Response<pb::LogStatus>, Status> {
        let mut positions = positions(&self.watch, &self.relay);
        let syncs = self.watch.syncs.summary();
        let (role, leader) = match &*self.role.borrow() {
            Role::Writer => ("writer", self.advertised.clone()),
            Role::Standby { leader } => ("standby", leader.clone().unwrap_or_default()),
        };
        if role == "standby" {
            // Its log is what it read from the stream.
            positions.published = positions.log;
        }
        Ok(Response::new(pb::LogStatus {
            role: role.to_string(),
            leader,
            log_position: positions.log,
            published_position: positions.published,
            relay_lag: positions.relay_lag(),
            nats_connected: self.relay.connected(),
            relay_error: self.relay.error().unwrap_or_default(),
            stream: self.stream.clone(),
            durability: self.log.durability().as_str().to_string(),
            sync_p50_us: syncs.p50_us,
            sync_p99_us: syncs.p99_us,
            sync_max_us: syncs.max_us,
            commands_per_sync: syncs.commands_per_sync,
            syncs_total: syncs.total,
        }))
    }

    async fn read_log(
        &self,
        request: Request<pb::ReadLogRequest>,
    ) -> Result<Response<pb::ReadLogResponse>, Status> {
        let request = request.into_inner();
        let from = request.from_position.max(1);
        let limit = read_limit(request.limit);
        let durable = *self.watch.durable_position.borrow();
        let log = self.log.clone();
        let rows = tokio::task::spawn_blocking(move || log.read_range(from, durable, limit))
            .await
            .map_err(log_failure)?
            .map_err(log_failure)?;
        let next = match rows.last() {
            Some((last, _)) if *last < durable => last + 1,
            _ => 0,
        };
        let events = decode_all(rows)?;
        Ok(Response::new(pb::ReadLogResponse { events, next }))
    }

    async fn read_stream(
        &self,
        request: Request<pb::ReadStreamRequest>,
    ) -> Result<Response<pb::ReadLogResponse>, Status> {
        let request = request.into_inner();
        let stream = StreamId::parse(&request.stream_id)
            .map_err(|e| invalid_argument(&[FieldViolation::new("stream_id", e.to_string())]))?;
        let from = request.from_version.max(1);
        let limit = read_limit(request.limit);
        let durable = *self.watch.durable_position.borrow();
        let log = self.log.clone();
        let mut events = tokio::task::spawn_blocking(move || log.read_stream(&stream, from, limit))
            .await
            .map_err(log_failure)?
            .map_err(log_failure)?;
        // Only what is durable is visible.
        events.retain(|e| e.position <= durable);
        let next = match events.last() {
            Some(last) if events.len() == limit => last.stream_version + 1,
            _ => 0,
        };
        Ok(Response::new(pb::ReadLogResponse { events, next }))
    }
}
