//! The Product aggregate (inventory): creation, restock, price change, and the stock
//! movements orders cause (reserve, release, commit).
//!
//! Invariant, always: `0 <= reserved <= on_hand`. Reservations are decided by the Order
//! aggregate against `available = on_hand - reserved`; this module only folds them.

use shop_shared::pb;

use super::{Command, DomainError, Event, State, ON_HAND_MAX};

/// Current state of one product.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Product {
    /// Stream version: the number of events folded in.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(int64, tag = "3")]
    pub price_cents: i64,
    /// Units in the warehouse, reserved ones included.
    #[prost(int64, tag = "4")]
    pub on_hand: i64,
    /// Units set aside for open orders.
    #[prost(int64, tag = "5")]
    pub reserved: i64,
}

impl Product {
    /// Units that can still be reserved.
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }
}

/// Product commands.
pub(super) fn decide(command: &Command, state: &impl State) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::CreateProduct {
            sku,
            name,
            price_cents,
            initial_stock,
        } => {
            if state.product(sku).is_some() {
                return Err(DomainError::ProductExists(sku.clone()));
            }
            Ok(vec![Event::ProductCreated(pb::ProductCreated {
                sku: sku.clone(),
                name: name.trim().to_string(),
                price_cents: *price_cents,
                initial_stock: *initial_stock,
            })])
        }
        Command::RestockProduct { sku, quantity } => {
            let product = existing(state, sku)?;
            if product
                .on_hand
                .checked_add(*quantity)
                .is_none_or(|n| n > ON_HAND_MAX)
            {
                return Err(DomainError::StockLimit {
                    sku: sku.clone(),
                    quantity: *quantity,
                });
            }
            Ok(vec![Event::ProductRestocked(pb::ProductRestocked {
                sku: sku.clone(),
                quantity: *quantity,
            })])
        }
        Command::ChangeProductPrice { sku, price_cents } => {
            existing(state, sku)?;
            Ok(vec![Event::ProductPriceChanged(pb::ProductPriceChanged {
                sku: sku.clone(),
                price_cents: *price_cents,
            })])
        }
        other => unreachable!("not a product command: {}", other.name()),
    }
}

/// The product, if it exists.
pub(super) fn existing<'s>(state: &'s impl State, sku: &str) -> Result<&'s Product, DomainError> {
    state
        .product(sku)
        .ok_or_else(|| DomainError::ProductNotFound(sku.to_string()))
}

/// Folds one product event into the state. Events of other aggregates leave it as is.
pub fn evolve(state: Option<Product>, event: &Event) -> Product {
    let mut p = state.unwrap_or_default();
    match event {
        Event::ProductCreated(e) => {
            p.name.clone_from(&e.name);
            p.price_cents = e.price_cents;
            p.on_hand = e.initial_stock;
            p.reserved = 0;
        }
        Event::ProductRestocked(e) => p.on_hand = p.on_hand.saturating_add(e.quantity),
        Event::ProductPriceChanged(e) => p.price_cents = e.price_cents,
        Event::StockReserved(e) => p.reserved = p.reserved.saturating_add(e.quantity),
        Event::StockReleased(e) => p.reserved = p.reserved.saturating_sub(e.quantity),
        Event::StockCommitted(e) => {
            p.reserved = p.reserved.saturating_sub(e.quantity);
            p.on_hand = p.on_hand.saturating_sub(e.quantity);
        }
        _ => return p,
    }
    p.version += 1;
    p
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn create_then_restock_then_reprice() {
        let mut m = Memory::default();
        m.when(create_product("p1", 250, 10)).unwrap();
        m.when(Command::RestockProduct {
            sku: "p1".into(),
            quantity: 5,
        })
        .unwrap();
        m.when(Command::ChangeProductPrice {
            sku: "p1".into(),
            price_cents: 300,
        })
        .unwrap();
        let p = &m.products()["p1"];
        assert_eq!(
            (p.on_hand, p.reserved, p.price_cents, p.version),
            (15, 0, 300, 3)
        );
    }

    #[test]
    fn create_twice_is_already_exists() {
        let mut m = Memory::default();
        m.when(create_product("p1", 1, 1)).unwrap();
        assert_eq!(
            m.when(create_product("p1", 1, 1)),
            Err(DomainError::ProductExists("p1".into()))
        );
    }

    #[test]
    fn unknown_product_is_not_found() {
        let mut m = Memory::default();
        assert_eq!(
            m.when(Command::RestockProduct {
                sku: "nope".into(),
                quantity: 1
            }),
            Err(DomainError::ProductNotFound("nope".into()))
        );
        assert_eq!(
            m.when(Command::ChangeProductPrice {
                sku: "nope".into(),
                price_cents: 1
            }),
            Err(DomainError::ProductNotFound("nope".into()))
        );
    }

    #[test]
    fn restock_cannot_pass_the_stock_limit() {
        let mut m = Memory::given([Event::ProductCreated(pb::ProductCreated {
            sku: "p1".into(),
            name: "n".into(),
            price_cents: 1,
            initial_stock: ON_HAND_MAX - 5,
        })]);
        let restock = |quantity| Command::RestockProduct {
            sku: "p1".into(),
            quantity,
        };
        assert!(m.when(restock(5)).is_ok());
        assert_eq!(m.products()["p1"].on_hand, ON_HAND_MAX);
        assert_eq!(
            m.when(restock(1)),
            Err(DomainError::StockLimit {
                sku: "p1".into(),
                quantity: 1
            })
        );
    }
}
