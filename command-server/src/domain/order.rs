//! The Order aggregate: place (reserving stock on every product, all lines or none), pay
//! (exact amount), ship (commits the stock), cancel (releases it).
//!
//! Status moves only PLACED → PAID → SHIPPED, or PLACED/PAID → CANCELLED.

use shop_shared::ids::StreamId;
use shop_shared::pb;
use shop_shared::pb::OrderStatus;

use super::{customer, product, Command, DomainError, Event, LineRequest, State, OPEN_ORDERS};
use crate::log::{IndexChange, IndexEntry};

/// Current state of one order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Order {
    /// Stream version: the number of events folded in.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub customer_id: String,
    #[prost(enumeration = "OrderStatus", tag = "3")]
    pub status: i32,
    /// Lines with the prices and names captured at placement.
    #[prost(message, repeated, tag = "4")]
    pub lines: Vec<pb::OrderLine>,
    #[prost(int64, tag = "5")]
    pub total_cents: i64,
}

impl Order {
    /// Whether the order still holds reserved stock (PLACED or PAID).
    pub fn is_open(&self) -> bool {
        matches!(self.status(), OrderStatus::Placed | OrderStatus::Paid)
    }
}

/// The product streams an order's lines touch (for loading them before shipping or
/// cancelling).
pub fn products_of(order: &Order) -> impl Iterator<Item = StreamId> + '_ {
    order.lines.iter().map(|l| StreamId::product(&l.sku))
}

/// Order commands.
pub(super) fn decide(command: &Command, state: &impl State) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::PlaceOrder {
            order_id,
            customer_id,
            lines,
        } => place_order(state, order_id, customer_id, lines),
        Command::PayOrder {
            order_id,
            amount_cents,
            payment_ref,
        } => {
            let order = existing(state, order_id)?;
            require(order_id, order, &[OrderStatus::Placed], "pay")?;
            if *amount_cents != order.total_cents {
                return Err(DomainError::AmountMismatch {
                    amount_cents: *amount_cents,
                    total_cents: order.total_cents,
                });
            }
            Ok(vec![Event::OrderPaid(pb::OrderPaid {
                order_id: order_id.clone(),
                amount_cents: *amount_cents,
                payment_ref: payment_ref.trim().to_string(),
            })])
        }
        Command::ShipOrder { order_id, tracking } => {
            let order = existing(state, order_id)?;
            require(order_id, order, &[OrderStatus::Paid], "ship")?;
            let shipped = Event::OrderShipped(pb::OrderShipped {
                order_id: order_id.clone(),
                tracking: tracking.trim().to_string(),
            });
            Ok(with_lines(
                shipped,
                order_id,
                order,
                |sku, order_id, quantity| {
                    Event::StockCommitted(pb::StockCommitted {
                        sku,
                        order_id,
                        quantity,
                    })
                },
            ))
        }
        Command::CancelOrder { order_id, reason } => {
            let order = existing(state, order_id)?;
            let open = [OrderStatus::Placed, OrderStatus::Paid];
            require(order_id, order, &open, "cancel")?;
            let cancelled = Event::OrderCancelled(pb::OrderCancelled {
                order_id: order_id.clone(),
                reason: reason.trim().to_string(),
            });
            Ok(with_lines(
                cancelled,
                order_id,
                order,
                |sku, order_id, quantity| {
                    Event::StockReleased(pb::StockReleased {
                        sku,
                        order_id,
                        quantity,
                    })
                },
            ))
        }
        other => unreachable!("not an order command: {}", other.name()),
    }
}

/// PlaceOrder: every line reserved, or none.
fn place_order(
    state: &impl State,
    order_id: &str,
    customer_id: &str,
    lines: &[LineRequest],
) -> Result<Vec<Event>, DomainError> {
    if state.order(order_id).is_some() {
        return Err(DomainError::OrderExists(order_id.to_string()));
    }
    customer::live(state, customer_id)?;
    let mut placed_lines = Vec::with_capacity(lines.len());
    let mut reservations = Vec::with_capacity(lines.len());
    let mut total_cents: i64 = 0;
    for line in lines {
        let product = product::existing(state, &line.sku)?;
        if product.available() < line.quantity {
            return Err(DomainError::InsufficientStock {
                sku: line.sku.clone(),
                requested: line.quantity,
                available: product.available(),
            });
        }
        // Bounded by validation (price, quantity and line limits), so this never
        // saturates; saturating keeps it panic-free regardless.
        total_cents = total_cents.saturating_add(product.price_cents.saturating_mul(line.quantity));
        placed_lines.push(pb::OrderLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents: product.price_cents,
            product_name: product.name.clone(),
        });
        reservations.push(Event::StockReserved(pb::StockReserved {
            sku: line.sku.clone(),
            order_id: order_id.to_string(),
            quantity: line.quantity,
        }));
    }
    let mut events = Vec::with_capacity(1 + reservations.len());
    events.push(Event::OrderPlaced(pb::OrderPlaced {
        order_id: order_id.to_string(),
        customer_id: customer_id.to_string(),
        lines: placed_lines,
        total_cents,
    }));
    events.extend(reservations);
    Ok(events)
}

/// `first`, then one event per line of `order` (its stock committed or released).
fn with_lines(
    first: Event,
    order_id: &str,
    order: &Order,
    line_event: fn(String, String, i64) -> Event,
) -> Vec<Event> {
    let mut events = Vec::with_capacity(1 + order.lines.len());
    events.push(first);
    events.extend(
        order
            .lines
            .iter()
            .map(|l| line_event(l.sku.clone(), order_id.to_string(), l.quantity)),
    );
    events
}

fn existing<'s>(state: &'s impl State, order_id: &str) -> Result<&'s Order, DomainError> {
    state
        .order(order_id)
        .ok_or_else(|| DomainError::OrderNotFound(order_id.to_string()))
}

fn require(
    order_id: &str,
    order: &Order,
    allowed: &[OrderStatus],
    action: &'static str,
) -> Result<(), DomainError> {
    if allowed.contains(&order.status()) {
        Ok(())
    } else {
        Err(DomainError::InvalidOrderState {
            order_id: order_id.to_string(),
            status: status_name(order.status()),
            action,
        })
    }
}

/// Upper-case status name, as users see it.
pub fn status_name(status: OrderStatus) -> &'static str {
    match status {
        OrderStatus::Unspecified => "UNKNOWN",
        OrderStatus::Placed => "PLACED",
        OrderStatus::Paid => "PAID",
        OrderStatus::Shipped => "SHIPPED",
        OrderStatus::Cancelled => "CANCELLED",
    }
}

/// Folds one order event into the state. Events of other aggregates leave it as is.
pub fn evolve(state: Option<Order>, event: &Event) -> Order {
    let mut o = state.unwrap_or_default();
    match event {
        Event::OrderPlaced(e) => {
            o.customer_id.clone_from(&e.customer_id);
            o.lines.clone_from(&e.lines);
            o.total_cents = e.total_cents;
            o.set_status(OrderStatus::Placed);
        }
        Event::OrderPaid(_) => o.set_status(OrderStatus::Paid),
        Event::OrderShipped(_) => o.set_status(OrderStatus::Shipped),
        Event::OrderCancelled(_) => o.set_status(OrderStatus::Cancelled),
        _ => return o,
    }
    o.version += 1;
    o
}

/// The open-orders index entry of an order: present while it is PLACED or PAID.
pub(super) fn index_changes(
    order_id: &str,
    before: Option<&Order>,
    after: &Order,
) -> Vec<IndexChange> {
    if before.is_some_and(Order::is_open) == after.is_open() {
        return Vec::new();
    }
    let key = open_order_key(&after.customer_id, order_id);
    if after.is_open() {
        vec![IndexChange::put(OPEN_ORDERS, key, Vec::new())]
    } else {
        vec![IndexChange::remove(OPEN_ORDERS, key)]
    }
}

fn open_order_key(customer_id: &str, order_id: &str) -> Vec<u8> {
    let mut key = open_orders_prefix(customer_id);
    key.extend_from_slice(order_id.as_bytes());
    key
}

/// The prefix of a customer's entries in the open-orders index (to scan).
pub fn open_orders_prefix(customer_id: &str) -> Vec<u8> {
    let mut key = customer_id.as_bytes().to_vec();
    key.push(0);
    key
}

/// The order ids of index entries scanned by [`open_orders_prefix`].
pub fn open_order_ids(prefix: &[u8], entries: Vec<IndexEntry>) -> Vec<String> {
    entries
        .into_iter()
        .filter_map(|(key, _)| key.strip_prefix(prefix).map(<[u8]>::to_vec))
        .map(|id| String::from_utf8_lossy(&id).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    /// A customer `c1` and products `a` (price 100, stock 10) and `b` (price 250, stock 2).
    fn shop() -> Memory {
        let mut m = Memory::default();
        m.when(register("c1", "c1@x.io")).unwrap();
        m.when(create_product("a", 100, 10)).unwrap();
        m.when(create_product("b", 250, 2)).unwrap();
        m
    }

    fn stock(m: &Memory, sku: &str) -> (i64, i64) {
        let p = &m.products()[sku];
        (p.on_hand, p.reserved)
    }

    fn pay(order_id: &str, amount_cents: i64) -> Command {
        Command::PayOrder {
            order_id: order_id.into(),
            amount_cents,
            payment_ref: "pay-1".into(),
        }
    }

    fn ship(order_id: &str) -> Command {
        Command::ShipOrder {
            order_id: order_id.into(),
            tracking: "trk".into(),
        }
    }

    fn cancel(order_id: &str) -> Command {
        Command::CancelOrder {
            order_id: order_id.into(),
            reason: "changed mind".into(),
        }
    }

    #[test]
    fn place_captures_prices_and_reserves_every_line() {
        let mut m = shop();
        let events = m.when(place("o1", "c1", &[("a", 3), ("b", 2)])).unwrap();
        let Event::OrderPlaced(placed) = &events[0] else {
            panic!("first event must be OrderPlaced: {events:?}");
        };
        assert_eq!(placed.total_cents, 3 * 100 + 2 * 250);
        assert_eq!(placed.lines[1].unit_price_cents, 250);
        assert_eq!(placed.lines[1].product_name, "Product b");
        assert_eq!(events.len(), 3);
        assert!(matches!(&events[1], Event::StockReserved(r) if r.sku == "a" && r.quantity == 3));
        assert_eq!(stock(&m, "a"), (10, 3));
        assert_eq!(stock(&m, "b"), (2, 2));
        assert_eq!(m.orders()["o1"].status(), OrderStatus::Placed);
        assert_eq!(m.orders()["o1"].version, 1);
    }

    #[test]
    fn every_order_event_moves_the_version() {
        let mut m = shop();
        m.when(place("o1", "c1", &[("a", 1)])).unwrap();
        m.when(pay("o1", 100)).unwrap();
        m.when(ship("o1")).unwrap();
        assert_eq!(m.orders()["o1"].version, 3);
    }

    /// A customer's open orders are found by prefix, and only theirs (`c1` is a prefix of
    /// `c10` as a string, not as an index prefix).
    #[test]
    fn open_orders_are_indexed_per_customer() {
        let open = Order {
            customer_id: "c1".into(),
            status: OrderStatus::Placed as i32,
            ..Default::default()
        };
        let changes = index_changes("o1", None, &open);
        assert_eq!(changes.len(), 1);
        let key = &changes[0].key;
        let prefix = open_orders_prefix("c1");
        assert!(key.starts_with(&prefix) && !key.starts_with(&open_orders_prefix("c10")));
        let other = open_order_key("c10", "o2");
        assert!(!other.starts_with(&prefix));
        assert_eq!(
            open_order_ids(&prefix, vec![(key.clone(), Vec::new())]),
            ["o1"]
        );
        let paid = Order {
            status: OrderStatus::Paid as i32,
            ..open.clone()
        };
        assert!(
            index_changes("o1", Some(&open), &paid).is_empty(),
            "still open"
        );
        let shipped = Order {
            status: OrderStatus::Shipped as i32,
            ..open.clone()
        };
        let closed = index_changes("o1", Some(&paid), &shipped);
        assert_eq!((closed.len(), closed[0].value.is_none()), (1, true));
        assert_eq!(&closed[0].key, key);
    }

    #[test]
    fn insufficient_stock_reserves_nothing() {
        let mut m = shop();
        assert_eq!(
            m.when(place("o1", "c1", &[("a", 1), ("b", 3)])),
            Err(DomainError::InsufficientStock {
                sku: "b".into(),
                requested: 3,
                available: 2
            })
        );
        assert_eq!(stock(&m, "a"), (10, 0));
        assert!(m.orders().is_empty());
    }

    #[test]
    fn reservations_reduce_what_the_next_order_can_take() {
        let mut m = shop();
        m.when(place("o1", "c1", &[("b", 2)])).unwrap();
        assert!(matches!(
            m.when(place("o2", "c1", &[("b", 1)])),
            Err(DomainError::InsufficientStock { available: 0, .. })
        ));
    }

    #[test]
    fn place_needs_a_live_customer_and_existing_products_and_a_new_id() {
        let mut m = shop();
        assert_eq!(
            m.when(place("o1", "nobody", &[("a", 1)])),
            Err(DomainError::CustomerNotFound("nobody".into()))
        );
        assert_eq!(
            m.when(place("o1", "c1", &[("a", 1), ("zzz", 1)])),
            Err(DomainError::ProductNotFound("zzz".into()))
        );
        m.when(place("o1", "c1", &[("a", 1)])).unwrap();
        assert_eq!(
            m.when(place("o1", "c1", &[("a", 1)])),
            Err(DomainError::OrderExists("o1".into()))
        );
        m.when(Command::DeleteCustomer {
            customer_id: "c1".into(),
            reason: String::new(),
        })
        .unwrap();
        assert_eq!(
            m.when(place("o2", "c1", &[("a", 1)])),
            Err(DomainError::CustomerDeleted("c1".into()))
        );
    }

    #[test]
    fn pay_needs_the_exact_total_and_a_placed_order() {
        let mut m = shop();
        m.when(place("o1", "c1", &[("a", 2)])).unwrap();
        assert_eq!(
            m.when(pay("o1", 199)),
            Err(DomainError::AmountMismatch {
                amount_cents: 199,
                total_cents: 200
            })
        );
        m.when(pay("o1", 200)).unwrap();
        assert_eq!(
            m.when(pay("o1", 200)),
            Err(DomainError::InvalidOrderState {
                order_id: "o1".into(),
                status: "PAID",
                action: "pay"
            })
        );
        assert_eq!(
            m.when(pay("o9", 1)),
            Err(DomainError::OrderNotFound("o9".into()))
        );
    }

    #[test]
    fn ship_commits_stock_and_only_after_payment() {
        let mut m = shop();
        m.when(place("o1", "c1", &[("a", 4)])).unwrap();
        assert!(matches!(
            m.when(ship("o1")),
            Err(DomainError::InvalidOrderState {
                status: "PLACED",
                ..
            })
        ));
        m.when(pay("o1", 400)).unwrap();
        let events = m.when(ship("o1")).unwrap();
        assert!(matches!(&events[1], Event::StockCommitted(c) if c.quantity == 4));
        assert_eq!(stock(&m, "a"), (6, 0));
        assert_eq!(m.orders()["o1"].status(), OrderStatus::Shipped);
        assert!(matches!(
            m.when(cancel("o1")),
            Err(DomainError::InvalidOrderState {
                status: "SHIPPED",
                ..
            })
        ));
    }

    #[test]
    fn cancel_releases_stock_from_placed_or_paid() {
        let mut m = shop();
        m.when(place("o1", "c1", &[("a", 4), ("b", 1)])).unwrap();
        m.when(place("o2", "c1", &[("a", 1)])).unwrap();
        m.when(pay("o2", 100)).unwrap();
        m.when(cancel("o1")).unwrap();
        m.when(cancel("o2")).unwrap();
        assert_eq!(stock(&m, "a"), (10, 0));
        assert_eq!(stock(&m, "b"), (2, 0));
        assert!(matches!(
            m.when(cancel("o1")),
            Err(DomainError::InvalidOrderState {
                status: "CANCELLED",
                ..
            })
        ));
        assert!(matches!(
            m.when(pay("o1", 500)),
            Err(DomainError::InvalidOrderState {
                status: "CANCELLED",
                ..
            })
        ));
    }
}
