//! The registry of aggregates: everything the write pipeline needs to know about them,
//! behind kind-agnostic calls, so that `writer/` and `log/` never name one.
//!
//! - [`Aggregate`]: the state of any aggregate, its version, its stored bytes, `evolve`.
//! - [`Command::reads`]: the streams and index entries `decide` looks at.
//! - [`Aggregate::index_changes`]: the secondary index entries an event changes, written
//!   atomically with the event's commit (production and the test model both use it).
//!
//! Adding an aggregate means one arm in each `match` below (the compiler lists them).

use prost::Message;
use shop_shared::ids::{StreamId, StreamKind};

use super::{
    customer, order, product, shipment, Command, Customer, Event, Order, Product, Shipment, State,
};
use crate::log::{IndexChange, IndexName};

/// Email key ([`super::email_key`]) → id of the live customer holding it: emails are
/// unique among live customers.
pub const EMAILS: IndexName = IndexName::new(b'E', "emails");
/// customer_id NUL order_id → empty, for every open (PLACED or PAID) order: what the
/// policy cancels when a customer is deleted.
pub const OPEN_ORDERS: IndexName = IndexName::new(b'O', "open_orders");
/// order_id → id of its shipment: an order has at most one.
pub const SHIPMENTS_BY_ORDER: IndexName = IndexName::new(b'H', "shipments_by_order");

/// The state of one aggregate, whatever its kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Aggregate {
    Customer(Customer),
    Product(Product),
    Order(Order),
    Shipment(Shipment),
}

/// Something `decide` reads, which the pipeline loads before calling it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReadKey {
    /// An aggregate's state.
    Stream(StreamId),
    /// One entry of a secondary index.
    Index(IndexName, Vec<u8>),
}

impl Aggregate {
    /// The stream version: the number of events folded in.
    pub fn version(&self) -> u64 {
        match self {
            Aggregate::Customer(c) => c.version,
            Aggregate::Product(p) => p.version,
            Aggregate::Order(o) => o.version,
            Aggregate::Shipment(s) => s.version,
        }
    }

    /// The bytes stored in the log's state rows.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Aggregate::Customer(c) => c.encode_to_vec(),
            Aggregate::Product(p) => p.encode_to_vec(),
            Aggregate::Order(o) => o.encode_to_vec(),
            Aggregate::Shipment(s) => s.encode_to_vec(),
        }
    }

    /// Decodes a stored state of a stream of `kind`.
    pub fn decode(kind: StreamKind, bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Ok(match kind {
            StreamKind::Customer => Aggregate::Customer(Customer::decode(bytes)?),
            StreamKind::Product => Aggregate::Product(Product::decode(bytes)?),
            StreamKind::Order => Aggregate::Order(Order::decode(bytes)?),
            StreamKind::Shipment => Aggregate::Shipment(Shipment::decode(bytes)?),
        })
    }

    /// Folds one event of a stream of `kind` into its state (`None`: no events yet).
    pub fn evolve(kind: StreamKind, before: Option<Aggregate>, event: &Event) -> Aggregate {
        match kind {
            StreamKind::Customer => {
                Aggregate::Customer(customer::evolve(before.and_then(Self::customer), event))
            }
            StreamKind::Product => {
                Aggregate::Product(product::evolve(before.and_then(Self::product), event))
            }
            StreamKind::Order => {
                Aggregate::Order(order::evolve(before.and_then(Self::order), event))
            }
            StreamKind::Shipment => {
                Aggregate::Shipment(shipment::evolve(before.and_then(Self::shipment), event))
            }
        }
    }

    /// The invariants every state keeps, checked in release builds too, before a
    /// command's events are written: a violation is a bug in `decide`, and the command is
    /// refused instead of written (`Err` says what is wrong).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Aggregate::Product(p) if p.reserved < 0 || p.reserved > p.on_hand => Err(format!(
                "stock would be {} reserved of {} on hand",
                p.reserved, p.on_hand
            )),
            _ => Ok(()),
        }
    }

    /// The index entries that change when `stream` goes from `before` to `after`.
    pub fn index_changes(
        stream: &StreamId,
        before: Option<&Aggregate>,
        after: &Aggregate,
    ) -> Vec<IndexChange> {
        match after {
            Aggregate::Customer(after) => {
                let before = before.and_then(Self::as_customer);
                customer::index_changes(&stream.id, before, after)
            }
            Aggregate::Order(after) => {
                let before = before.and_then(Self::as_order);
                order::index_changes(&stream.id, before, after)
            }
            Aggregate::Shipment(after) => {
                let before = before.and_then(Self::as_shipment);
                shipment::index_changes(&stream.id, before, after)
            }
            Aggregate::Product(_) => Vec::new(),
        }
    }

    fn customer(self) -> Option<Customer> {
        match self {
            Aggregate::Customer(c) => Some(c),
            _ => None,
        }
    }

    fn product(self) -> Option<Product> {
        match self {
            Aggregate::Product(p) => Some(p),
            _ => None,
        }
    }

    fn order(self) -> Option<Order> {
        match self {
            Aggregate::Order(o) => Some(o),
            _ => None,
        }
    }

    fn shipment(self) -> Option<Shipment> {
        match self {
            Aggregate::Shipment(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn as_shipment(&self) -> Option<&Shipment> {
        match self {
            Aggregate::Shipment(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn as_customer(&self) -> Option<&Customer> {
        match self {
            Aggregate::Customer(c) => Some(c),
            _ => None,
        }
    }

    pub(super) fn as_product(&self) -> Option<&Product> {
        match self {
            Aggregate::Product(p) => Some(p),
            _ => None,
        }
    }

    pub(super) fn as_order(&self) -> Option<&Order> {
        match self {
            Aggregate::Order(o) => Some(o),
            _ => None,
        }
    }
}

/// Rounds of [`Command::reads`] a command may need: the order, then its products.
pub const READ_ROUNDS_MAX: usize = 3;

impl Command {
    /// What `decide` reads, given what is loaded so far. Some keys are known only from
    /// loaded state (the products of the order a ShipOrder names), so the pipeline calls
    /// this again after loading, until it asks for nothing new (at most
    /// [`READ_ROUNDS_MAX`] rounds).
    pub fn reads(&self, state: &impl State) -> Vec<ReadKey> {
        let mut keys: Vec<ReadKey> = self
            .streams_read()
            .into_iter()
            .map(ReadKey::Stream)
            .collect();
        match self {
            Command::RegisterCustomer { email, .. } => {
                keys.push(ReadKey::Index(EMAILS, super::email_key(email).into_bytes()));
            }
            Command::CreateShipment { order_id, .. } => {
                keys.push(ReadKey::Index(
                    SHIPMENTS_BY_ORDER,
                    order_id.as_bytes().to_vec(),
                ));
            }
            _ => {}
        }
        let own = self.stream();
        if let Some(o) = state.aggregate(&own).and_then(Aggregate::as_order) {
            keys.extend(order::products_of(o).map(ReadKey::Stream));
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    /// Shipping or cancelling reads the order and then every product on it (their
    /// stock moves), known only once the order is loaded.
    #[test]
    fn an_orders_products_are_read_once_the_order_is_known() {
        let mut m = Memory::default();
        m.when(register("c1", "a@x.io")).unwrap();
        m.when(create_product("a", 100, 5)).unwrap();
        m.when(create_product("b", 100, 5)).unwrap();
        m.when(place("o1", "c1", &[("a", 1), ("b", 2)])).unwrap();
        let cancel = Command::CancelOrder {
            order_id: "o1".into(),
            reason: String::new(),
        };
        let streams = |keys: Vec<ReadKey>| -> Vec<String> {
            keys.iter()
                .filter_map(|k| match k {
                    ReadKey::Stream(s) => Some(s.to_string()),
                    ReadKey::Index(..) => None,
                })
                .collect()
        };
        assert_eq!(
            streams(cancel.reads(&m)),
            ["order-o1", "product-a", "product-b"]
        );
        assert_eq!(streams(cancel.reads(&Memory::default())), ["order-o1"]);
        let shipment = Command::CreateShipment {
            shipment_id: "s1".into(),
            order_id: "o1".into(),
            carrier: "C".into(),
            tracking_code: "T".into(),
        };
        let keys = shipment.reads(&m);
        assert!(keys.contains(&ReadKey::Index(SHIPMENTS_BY_ORDER, b"o1".to_vec())));
        assert!(keys.contains(&ReadKey::Stream(StreamId::order("o1"))));
        let register = register("c2", " B@X.io ");
        assert!(register
            .reads(&m)
            .contains(&ReadKey::Index(EMAILS, b"b@x.io".to_vec())));
    }
}
