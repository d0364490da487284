//! The pure domain: commands, their validation, `decide` (all business rules) and
//! `evolve` (state after an event, no rules). Nothing here does I/O.
//!
//! - [`Command::validate`] checks what can be checked without state (field syntax,
//!   ranges); the gRPC adapter calls it before a command is queued, so malformed input
//!   never reaches the writer.
//! - [`decide`] reads the current state of the aggregates a command touches through
//!   [`State`] and returns the events to append, or a [`DomainError`].
//! - `evolve` in each aggregate module folds one event into that aggregate's state.
//!
//! Events are the protobuf payloads of the contract (`pb::event::Kind`): the domain emits
//! exactly what is stored and published.

mod aggregate;
pub mod customer;
pub mod order;
pub mod product;
pub mod shipment;

#[cfg(test)]
mod model_tests;

use shop_shared::grpc::FieldViolation;
use shop_shared::ids::{validate_id, StreamId};
use shop_shared::pb;

use crate::log::IndexName;

pub use aggregate::{Aggregate, ReadKey, EMAILS, OPEN_ORDERS, READ_ROUNDS_MAX, SHIPMENTS_BY_ORDER};
pub use customer::Customer;
pub use order::Order;
pub use product::Product;
pub use shipment::Shipment;

/// A domain event: one of the payloads of `shop.v1.Event`.
pub type Event = pb::event::Kind;

/// Longest customer or product name, in characters.
pub const NAME_LEN_MAX: usize = 200;
/// Longest address, reason, payment reference or tracking code, in characters.
pub const TEXT_LEN_MAX: usize = 500;
/// Longest email address (RFC 5321 path limit).
pub const EMAIL_LEN_MAX: usize = 254;
/// Order lines per order.
pub const ORDER_LINES_MAX: usize = 100;
/// Units of one sku per order line.
pub const LINE_QUANTITY_MAX: i64 = 1_000;
/// Units added by one restock.
pub const RESTOCK_QUANTITY_MAX: i64 = 1_000_000;
/// Largest price, in cents: keeps every order total (≤ 100 lines × 1000 units) far from
/// `i64` overflow.
pub const PRICE_CENTS_MAX: i64 = 100_000_000_000;
/// Largest initial stock of a product.
pub const INITIAL_STOCK_MAX: i64 = 1_000_000_000;
/// Largest stock a product may reach through restocks.
pub const ON_HAND_MAX: i64 = 1_000_000_000_000;

/// The commands of the shop (`proto/shop/v1/commands.proto`), with ids already filled in (the adapter generates missing
/// ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    RegisterCustomer {
        customer_id: String,
        name: String,
        email: String,
        address: String,
    },
    RenameCustomer {
        customer_id: String,
        name: String,
    },
    ChangeCustomerAddress {
        customer_id: String,
        address: String,
    },
    DeleteCustomer {
        customer_id: String,
        reason: String,
    },
    CreateProduct {
        sku: String,
        name: String,
        price_cents: i64,
        initial_stock: i64,
    },
    RestockProduct {
        sku: String,
        quantity: i64,
    },
    ChangeProductPrice {
        sku: String,
        price_cents: i64,
    },
    PlaceOrder {
        order_id: String,
        customer_id: String,
        lines: Vec<LineRequest>,
    },
    PayOrder {
        order_id: String,
        amount_cents: i64,
        payment_ref: String,
    },
    ShipOrder {
        order_id: String,
        tracking: String,
    },
    CancelOrder {
        order_id: String,
        reason: String,
    },
    CreateShipment {
        shipment_id: String,
        order_id: String,
        carrier: String,
        tracking_code: String,
    },
    RecordShipmentEvent {
        shipment_id: String,
        status: pb::ShipmentStatus,
        location: String,
        note: String,
    },
}

/// One requested order line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRequest {
    pub sku: String,
    pub quantity: i64,
}

/// What `decide` may read: the current state of aggregates and index entries. The
/// writer loads what a command needs (see [`Command::reads`]) before calling `decide`.
pub trait State {
    /// The state of a stream's aggregate (`None`: no events yet).
    fn aggregate(&self, stream: &StreamId) -> Option<&Aggregate>;
    /// The value of an index entry (see [`Aggregate::index_changes`]).
    fn index(&self, index: IndexName, key: &[u8]) -> Option<&[u8]>;

    fn customer(&self, customer_id: &str) -> Option<&Customer> {
        self.aggregate(&StreamId::customer(customer_id))
            .and_then(Aggregate::as_customer)
    }

    fn product(&self, sku: &str) -> Option<&Product> {
        self.aggregate(&StreamId::product(sku))
            .and_then(Aggregate::as_product)
    }

    fn order(&self, order_id: &str) -> Option<&Order> {
        self.aggregate(&StreamId::order(order_id))
            .and_then(Aggregate::as_order)
    }

    fn shipment(&self, shipment_id: &str) -> Option<&Shipment> {
        self.aggregate(&StreamId::shipment(shipment_id))
            .and_then(Aggregate::as_shipment)
    }

    /// The live (not deleted) customer holding this email, by [`email_key`].
    fn email_owner(&self, email_key: &str) -> Option<&str> {
        self.index(EMAILS, email_key.as_bytes())
            .and_then(|owner| std::str::from_utf8(owner).ok())
    }
}

/// Why a command was refused. Each variant names the gRPC status it becomes (mapped in
/// one place, `grpc.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// INVALID_ARGUMENT, with a BadRequest listing every field.
    #[error("invalid command")]
    Invalid(Vec<FieldViolation>),
    /// NOT_FOUND.
    #[error("customer {0:?} does not exist")]
    CustomerNotFound(String),
    /// NOT_FOUND.
    #[error("product {0:?} does not exist")]
    ProductNotFound(String),
    /// NOT_FOUND.
    #[error("order {0:?} does not exist")]
    OrderNotFound(String),
    /// ALREADY_EXISTS.
    #[error("customer {0:?} already exists")]
    CustomerExists(String),
    /// ALREADY_EXISTS.
    #[error("product {0:?} already exists")]
    ProductExists(String),
    /// ALREADY_EXISTS.
    #[error("order {0:?} already exists")]
    OrderExists(String),
    /// ALREADY_EXISTS.
    #[error("email {email:?} is already used by customer {customer_id:?}")]
    EmailTaken { email: String, customer_id: String },
    /// FAILED_PRECONDITION, reason CUSTOMER_DELETED.
    #[error("customer {0:?} is deleted")]
    CustomerDeleted(String),
    /// FAILED_PRECONDITION, reason INSUFFICIENT_STOCK.
    #[error("insufficient stock for sku {sku:?}: requested {requested}, available {available}")]
    InsufficientStock {
        sku: String,
        requested: i64,
        available: i64,
    },
    /// FAILED_PRECONDITION, reason INVALID_ORDER_STATE.
    #[error("order {order_id:?} is {status}; cannot {action}")]
    InvalidOrderState {
        order_id: String,
        status: &'static str,
        action: &'static str,
    },
    /// FAILED_PRECONDITION, reason AMOUNT_MISMATCH.
    #[error(
        "payment of {amount_cents} cents does not match the order total of {total_cents} cents"
    )]
    AmountMismatch { amount_cents: i64, total_cents: i64 },
    /// NOT_FOUND.
    #[error("shipment {0:?} does not exist")]
    ShipmentNotFound(String),
    /// ALREADY_EXISTS.
    #[error("shipment {0:?} already exists")]
    ShipmentExists(String),
    /// ALREADY_EXISTS, reason ORDER_HAS_SHIPMENT.
    #[error("order {order_id:?} already has shipment {shipment_id:?}")]
    OrderHasShipment {
        order_id: String,
        shipment_id: String,
    },
    /// FAILED_PRECONDITION, reason SHIPMENT_DELIVERED.
    #[error("shipment {0:?} is delivered; it takes no further event")]
    ShipmentDelivered(String),
    /// FAILED_PRECONDITION, reason TRACKING_LIMIT.
    #[error("shipment {0:?} has {max} events, the most one shipment keeps", max = shipment::TRACKING_EVENTS_MAX)]
    TrackingLimit(String),
    /// FAILED_PRECONDITION, reason STOCK_LIMIT.
    #[error("restocking {sku:?} by {quantity} would exceed the stock limit of {ON_HAND_MAX}")]
    StockLimit { sku: String, quantity: i64 },
}

impl Command {
    /// The command's own stream: its result's `stream_id` and `version`, and the stream
    /// `expected_version` is checked against.
    pub fn stream(&self) -> StreamId {
        match self {
            Command::RegisterCustomer { customer_id, .. }
            | Command::RenameCustomer { customer_id, .. }
            | Command::ChangeCustomerAddress { customer_id, .. }
            | Command::DeleteCustomer { customer_id, .. } => StreamId::customer(customer_id),
            Command::CreateProduct { sku, .. }
            | Command::RestockProduct { sku, .. }
            | Command::ChangeProductPrice { sku, .. } => StreamId::product(sku),
            Command::PlaceOrder { order_id, .. }
            | Command::PayOrder { order_id, .. }
            | Command::ShipOrder { order_id, .. }
            | Command::CancelOrder { order_id, .. } => StreamId::order(order_id),
            Command::CreateShipment { shipment_id, .. }
            | Command::RecordShipmentEvent { shipment_id, .. } => StreamId::shipment(shipment_id),
        }
    }

    /// Every stream whose state `decide` reads, the own stream first. Products an order
    /// touches are known only from the order itself, so for Ship/Cancel they are found
    /// after loading the order (see [`order::products_of`]).
    pub fn streams_read(&self) -> Vec<StreamId> {
        let mut streams = vec![self.stream()];
        if let Command::PlaceOrder {
            customer_id, lines, ..
        } = self
        {
            streams.push(StreamId::customer(customer_id));
            streams.extend(lines.iter().map(|l| StreamId::product(&l.sku)));
        }
        if let Command::CreateShipment { order_id, .. } = self {
            streams.push(StreamId::order(order_id));
        }
        streams
    }

    /// The command's name, as the RPC is called.
    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterCustomer { .. } => "RegisterCustomer",
            Command::RenameCustomer { .. } => "RenameCustomer",
            Command::ChangeCustomerAddress { .. } => "ChangeCustomerAddress",
            Command::DeleteCustomer { .. } => "DeleteCustomer",
            Command::CreateProduct { .. } => "CreateProduct",
            Command::RestockProduct { .. } => "RestockProduct",
            Command::ChangeProductPrice { .. } => "ChangeProductPrice",
            Command::PlaceOrder { .. } => "PlaceOrder",
            Command::PayOrder { .. } => "PayOrder",
            Command::ShipOrder { .. } => "ShipOrder",
            Command::CancelOrder { .. } => "CancelOrder",
            Command::CreateShipment { .. } => "CreateShipment",
            Command::RecordShipmentEvent { .. } => "RecordShipmentEvent",
        }
    }

    /// Checks everything that needs no state: id syntax, text lengths, email syntax,
    /// number ranges, order lines. Field names are the request's protobuf field paths.
    pub fn validate(&self) -> Result<(), DomainError> {
        let mut v = Violations::default();
        match self {
            Command::RegisterCustomer {
                customer_id,
                name,
                email,
                address,
            } => {
                v.id("customer_id", customer_id);
                v.name("name", name);
                v.email("email", email);
                v.text("address", address);
            }
            Command::RenameCustomer { customer_id, name } => {
                v.id("customer_id", customer_id);
                v.name("name", name);
            }
            Command::ChangeCustomerAddress {
                customer_id,
                address,
            } => {
                v.id("customer_id", customer_id);
                v.text("address", address);
            }
            Command::DeleteCustomer {
                customer_id,
                reason,
            } => {
                v.id("customer_id", customer_id);
                v.text("reason", reason);
            }
            Command::CreateProduct {
                sku,
                name,
                price_cents,
                initial_stock,
            } => {
                v.id("sku", sku);
                v.name("name", name);
                v.range("price_cents", *price_cents, 0, PRICE_CENTS_MAX);
                v.range("initial_stock", *initial_stock, 0, INITIAL_STOCK_MAX);
            }
            Command::RestockProduct { sku, quantity } => {
                v.id("sku", sku);
                v.range("quantity", *quantity, 1, RESTOCK_QUANTITY_MAX);
            }
            Command::ChangeProductPrice { sku, price_cents } => {
                v.id("sku", sku);
                v.range("price_cents", *price_cents, 0, PRICE_CENTS_MAX);
            }
            Command::PlaceOrder {
                order_id,
                customer_id,
                lines,
            } => {
                v.id("order_id", order_id);
                v.id("customer_id", customer_id);
                if lines.is_empty() {
                    v.add("lines", "an order needs at least one line");
                } else if lines.len() > ORDER_LINES_MAX {
                    v.add(
                        "lines",
                        format!("at most {ORDER_LINES_MAX} lines, got {}", lines.len()),
                    );
                } else {
                    let mut seen = std::collections::HashSet::with_capacity(lines.len());
                    for (i, line) in lines.iter().enumerate() {
                        v.id(&format!("lines[{i}].sku"), &line.sku);
                        v.range(
                            &format!("lines[{i}].quantity"),
                            line.quantity,
                            1,
                            LINE_QUANTITY_MAX,
                        );
                        if !seen.insert(line.sku.as_str()) {
                            v.add(
                                format!("lines[{i}].sku"),
                                format!("sku {:?} appears on more than one line", line.sku),
                            );
                        }
                    }
                }
            }
            Command::PayOrder {
                order_id,
                amount_cents,
                payment_ref,
            } => {
                v.id("order_id", order_id);
                v.range("amount_cents", *amount_cents, 0, i64::MAX);
                if payment_ref.trim().is_empty() {
                    v.add("payment_ref", "must not be empty");
                }
                v.text("payment_ref", payment_ref);
            }
            Command::ShipOrder { order_id, tracking } => {
                v.id("order_id", order_id);
                v.text("tracking", tracking);
            }
            Command::CancelOrder { order_id, reason } => {
                v.id("order_id", order_id);
                v.text("reason", reason);
            }
            Command::CreateShipment {
                shipment_id,
                order_id,
                carrier,
                tracking_code,
            } => {
                v.id("shipment_id", shipment_id);
                v.id("order_id", order_id);
                v.name("carrier", carrier);
                v.name("tracking_code", tracking_code);
            }
            Command::RecordShipmentEvent {
                shipment_id,
                status,
                location,
                note,
            } => {
                v.id("shipment_id", shipment_id);
                if !shipment::SCANNED.contains(status) {
                    v.add(
                        "status",
                        "must be IN_TRANSIT, OUT_FOR_DELIVERY, DELIVERED or EXCEPTION",
                    );
                }
                v.text("location", location);
                v.text("note", note);
            }
        }
        v.into_result()
    }
}

/// Decides a validated command against the current state: the events to append, or why
/// not. Never reads anything but `state`.
pub fn decide(command: &Command, state: &impl State) -> Result<Vec<Event>, DomainError> {
    debug_assert!(
        command.validate().is_ok(),
        "decide needs a validated command"
    );
    match command {
        Command::RegisterCustomer { .. }
        | Command::RenameCustomer { .. }
        | Command::ChangeCustomerAddress { .. }
        | Command::DeleteCustomer { .. } => customer::decide(command, state),
        Command::CreateProduct { .. }
        | Command::RestockProduct { .. }
        | Command::ChangeProductPrice { .. } => product::decide(command, state),
        Command::PlaceOrder { .. }
        | Command::PayOrder { .. }
        | Command::ShipOrder { .. }
        | Command::CancelOrder { .. } => order::decide(command, state),
        Command::CreateShipment { .. } | Command::RecordShipmentEvent { .. } => {
            shipment::decide(command, state)
        }
    }
}

/// The form of an email used for uniqueness: trimmed, lower-cased.
pub fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Accumulates every violation of a request, so one reply names all bad fields.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn id(&mut self, field: &str, value: &str) {
        if let Err(e) = validate_id(value) {
            let shown: String = value.chars().take(80).collect();
            self.add(
                field,
                format!("{e} (ids match [A-Za-z0-9_-]{{1,64}}; got {shown:?})"),
            );
        }
    }

    fn name(&mut self, field: &str, value: &str) {
        let chars = value.chars().count();
        if value.trim().is_empty() {
            self.add(field, "must not be empty");
        } else if chars > NAME_LEN_MAX {
            self.add(
                field,
                format!("must be at most {NAME_LEN_MAX} characters, got {chars}"),
            );
        } else if value.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
    }

    fn text(&mut self, field: &str, value: &str) {
        let chars = value.chars().count();
        if chars > TEXT_LEN_MAX {
            self.add(
                field,
                format!("must be at most {TEXT_LEN_MAX} characters, got {chars}"),
            );
        }
    }

    fn email(&mut self, field: &str, value: &str) {
        if let Err(why) = check_email(value) {
            self.add(field, why);
        }
    }

    fn range(&mut self, field: &str, value: i64, min: i64, max: i64) {
        if value < min || value > max {
            let bound = if max == i64::MAX {
                format!("must be at least {min}")
            } else {
                format!("must be between {min} and {max}")
            };
            self.add(field, format!("{bound}, got {value}"));
        }
    }

    fn into_result(self) -> Result<(), DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.0))
        }
    }
}

/// A pragmatic well-formedness check: one `@`, a non-empty local part without spaces, a
/// domain of dot-separated labels of letters, digits and hyphens with at least one dot.
fn check_email(email: &str) -> Result<(), String> {
    let email = email.trim();
    if email.is_empty() {
        return Err("must not be empty".into());
    }
    if email.len() > EMAIL_LEN_MAX {
        return Err(format!("must be at most {EMAIL_LEN_MAX} bytes"));
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return Err("must look like name@example.com (no '@')".into());
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '@' && c != '<' && c != '>');
    if !local_ok {
        return Err("must look like name@example.com (bad part before '@')".into());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    if !domain_ok {
        return Err("must look like name@example.com (bad domain)".into());
    }
    Ok(())
}

/// Given/when/then helpers for the aggregate tests, and the in-memory state the fuzz
/// targets (`fuzz/`, feature `testing`) decide commands against.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    /// An in-memory [`State`] built by folding events exactly as the writer does:
    /// [`Aggregate::evolve`] and [`Aggregate::index_changes`].
    #[derive(Default, Debug, Clone, PartialEq)]
    pub struct Memory {
        pub aggregates: HashMap<StreamId, Aggregate>,
        pub indexes: HashMap<(IndexName, Vec<u8>), Vec<u8>>,
    }

    impl Memory {
        pub fn given(events: impl IntoIterator<Item = Event>) -> Self {
            let mut m = Memory::default();
            for e in events {
                m.apply(&e);
            }
            m
        }

        pub fn apply(&mut self, event: &Event) {
            let stream = shop_shared::events::stream_of(event);
            let before = self.aggregates.remove(&stream);
            let after = Aggregate::evolve(stream.kind, before.clone(), event);
            for change in Aggregate::index_changes(&stream, before.as_ref(), &after) {
                let key = (change.index, change.key);
                match change.value {
                    Some(value) => self.indexes.insert(key, value),
                    None => self.indexes.remove(&key),
                };
            }
            self.aggregates.insert(stream, after);
        }

        /// Validates and decides; on success folds the events in, like the writer does.
        pub fn when(&mut self, command: Command) -> Result<Vec<Event>, DomainError> {
            command.validate()?;
            let events = decide(&command, self)?;
            for e in &events {
                self.apply(e);
            }
            Ok(events)
        }

        pub fn customers(&self) -> BTreeMap<&str, &Customer> {
            self.aggregates
                .iter()
                .filter_map(|(s, a)| Some((s.id.as_str(), a.as_customer()?)))
                .collect()
        }

        pub fn products(&self) -> BTreeMap<&str, &Product> {
            self.aggregates
                .iter()
                .filter_map(|(s, a)| Some((s.id.as_str(), a.as_product()?)))
                .collect()
        }

        pub fn shipments(&self) -> BTreeMap<&str, &Shipment> {
            self.aggregates
                .iter()
                .filter_map(|(s, a)| Some((s.id.as_str(), a.as_shipment()?)))
                .collect()
        }

        pub fn orders(&self) -> BTreeMap<&str, &Order> {
            self.aggregates
                .iter()
                .filter_map(|(s, a)| Some((s.id.as_str(), a.as_order()?)))
                .collect()
        }
    }

    impl State for Memory {
        fn aggregate(&self, stream: &StreamId) -> Option<&Aggregate> {
            self.aggregates.get(stream)
        }

        fn index(&self, index: IndexName, key: &[u8]) -> Option<&[u8]> {
            self.indexes.get(&(index, key.to_vec())).map(Vec::as_slice)
        }
    }

    pub fn field_names(err: &DomainError) -> Vec<String> {
        match err {
            DomainError::Invalid(v) => v.iter().map(|v| v.field.clone()).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    pub fn register(id: &str, email: &str) -> Command {
        Command::RegisterCustomer {
            customer_id: id.into(),
            name: format!("Name {id}"),
            email: email.into(),
            address: String::new(),
        }
    }

    pub fn create_product(sku: &str, price_cents: i64, stock: i64) -> Command {
        Command::CreateProduct {
            sku: sku.into(),
            name: format!("Product {sku}"),
            price_cents,
            initial_stock: stock,
        }
    }

    pub fn place(order_id: &str, customer_id: &str, lines: &[(&str, i64)]) -> Command {
        Command::PlaceOrder {
            order_id: order_id.into(),
            customer_id: customer_id.into(),
            lines: lines
                .iter()
                .map(|(sku, quantity)| LineRequest {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn email_syntax() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org", "  X@Y.Z  "] {
            assert_eq!(check_email(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@.co", "a@b..co", "a b@c.co", "a@-b.co", "a@b_c.co",
        ] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_email(&format!("{}@b.co", "a".repeat(65))).is_err());
    }

    #[test]
    fn every_bad_field_is_named() {
        let err = Command::PlaceOrder {
            order_id: "bad id".into(),
            customer_id: String::new(),
            lines: vec![
                LineRequest {
                    sku: "a".into(),
                    quantity: 0,
                },
                LineRequest {
                    sku: "a".into(),
                    quantity: 1001,
                },
            ],
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            field_names(&err),
            [
                "order_id",
                "customer_id",
                "lines[0].quantity",
                "lines[1].quantity",
                "lines[1].sku"
            ]
        );
    }

    #[test]
    fn order_line_limits() {
        let lines: Vec<(String, i64)> = (0..=ORDER_LINES_MAX)
            .map(|i| (format!("s{i}"), 1))
            .collect();
        let refs: Vec<(&str, i64)> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
        assert_eq!(
            field_names(&place("o", "c", &refs).validate().unwrap_err()),
            ["lines"]
        );
        assert_eq!(
            field_names(&place("o", "c", &[]).validate().unwrap_err()),
            ["lines"]
        );
        assert!(place("o", "c", &refs[..ORDER_LINES_MAX]).validate().is_ok());
    }

    #[test]
    fn text_limits_count_characters_not_bytes() {
        let name = "é".repeat(NAME_LEN_MAX);
        assert!(Command::RenameCustomer {
            customer_id: "c".into(),
            name: name.clone()
        }
        .validate()
        .is_ok());
        let err = Command::RenameCustomer {
            customer_id: "c".into(),
            name: format!("{name}é"),
        }
        .validate()
        .unwrap_err();
        assert_eq!(field_names(&err), ["name"]);
        let err = Command::RenameCustomer {
            customer_id: "c".into(),
            name: "   ".into(),
        }
        .validate()
        .unwrap_err();
        assert_eq!(field_names(&err), ["name"]);
    }

    #[test]
    fn number_ranges() {
        let err = Command::CreateProduct {
            sku: "s".into(),
            name: "n".into(),
            price_cents: -1,
            initial_stock: -1,
        }
        .validate()
        .unwrap_err();
        assert_eq!(field_names(&err), ["price_cents", "initial_stock"]);
        for q in [0, RESTOCK_QUANTITY_MAX + 1, -5] {
            let err = Command::RestockProduct {
                sku: "s".into(),
                quantity: q,
            }
            .validate()
            .unwrap_err();
            assert_eq!(field_names(&err), ["quantity"]);
        }
        let err = Command::PayOrder {
            order_id: "o".into(),
            amount_cents: -1,
            payment_ref: String::new(),
        }
        .validate()
        .unwrap_err();
        assert_eq!(field_names(&err), ["amount_cents", "payment_ref"]);
    }

    #[test]
    fn names_are_the_rpc_names() {
        assert_eq!(place("o", "c", &[("a", 1)]).name(), "PlaceOrder");
        assert_eq!(register("c", "a@b.co").name(), "RegisterCustomer");
    }

    #[test]
    fn text_email_and_range_limits_are_inclusive() {
        let address = |n: usize| Command::ChangeCustomerAddress {
            customer_id: "c".into(),
            address: "x".repeat(n),
        };
        assert!(address(TEXT_LEN_MAX).validate().is_ok());
        assert_eq!(
            field_names(&address(TEXT_LEN_MAX + 1).validate().unwrap_err()),
            ["address"]
        );
        let email = |domain_tail: usize| {
            format!(
                "{}@{}.{}.{}",
                "a".repeat(64),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(domain_tail)
            )
        };
        assert_eq!(email(61).len(), EMAIL_LEN_MAX);
        assert_eq!(check_email(&email(61)), Ok(()));
        assert!(check_email(&email(62)).is_err());
        assert_eq!(
            field_names(&register("c", "not-an-email").validate().unwrap_err()),
            ["email"]
        );
        let restock = |quantity| Command::RestockProduct {
            sku: "s".into(),
            quantity,
        };
        assert!(restock(RESTOCK_QUANTITY_MAX).validate().is_ok());
        let Err(DomainError::Invalid(v)) = Command::PayOrder {
            order_id: "o".into(),
            amount_cents: -1,
            payment_ref: "r".into(),
        }
        .validate() else {
            panic!("a negative amount is invalid")
        };
        assert_eq!(v[0].description, "must be at least 0, got -1");
        let Err(DomainError::Invalid(v)) = restock(0).validate() else {
            panic!("a zero restock is invalid")
        };
        assert_eq!(
            v[0].description,
            format!("must be between 1 and {RESTOCK_QUANTITY_MAX}, got 0")
        );
    }

    #[test]
    fn streams_read_lists_everything_place_order_needs() {
        let cmd = place("o1", "c1", &[("a", 1), ("b", 2)]);
        let streams: Vec<String> = cmd.streams_read().iter().map(ToString::to_string).collect();
        assert_eq!(
            streams,
            ["order-o1", "customer-c1", "product-a", "product-b"]
        );
    }
}
