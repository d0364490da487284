//! The Customer aggregate: registration with a unique email, rename, address change,
//! deletion (which frees the email). A deleted customer accepts no further command.

use shop_shared::pb;

use super::{email_key, Command, DomainError, Event, State, EMAILS};
use crate::log::IndexChange;

/// Current state of one customer, as stored in the command server's state rows.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Customer {
    /// Stream version: the number of events folded in.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub email: String,
    #[prost(string, tag = "4")]
    pub address: String,
    #[prost(bool, tag = "5")]
    pub deleted: bool,
}

/// Customer commands.
pub(super) fn decide(command: &Command, state: &impl State) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::RegisterCustomer {
            customer_id,
            name,
            email,
            address,
        } => {
            if state.customer(customer_id).is_some() {
                return Err(DomainError::CustomerExists(customer_id.clone()));
            }
            let email = email.trim();
            if let Some(owner) = state.email_owner(&email_key(email)) {
                return Err(DomainError::EmailTaken {
                    email: email.to_string(),
                    customer_id: owner.to_string(),
                });
            }
            Ok(vec![Event::CustomerRegistered(pb::CustomerRegistered {
                customer_id: customer_id.clone(),
                name: name.trim().to_string(),
                email: email.to_string(),
                address: address.trim().to_string(),
            })])
        }
        Command::RenameCustomer { customer_id, name } => {
            live(state, customer_id)?;
            Ok(vec![Event::CustomerRenamed(pb::CustomerRenamed {
                customer_id: customer_id.clone(),
                name: name.trim().to_string(),
            })])
        }
        Command::ChangeCustomerAddress {
            customer_id,
            address,
        } => {
            live(state, customer_id)?;
            Ok(vec![Event::CustomerAddressChanged(
                pb::CustomerAddressChanged {
                    customer_id: customer_id.clone(),
                    address: address.trim().to_string(),
                },
            )])
        }
        Command::DeleteCustomer {
            customer_id,
            reason,
        } => {
            live(state, customer_id)?;
            Ok(vec![Event::CustomerDeleted(pb::CustomerDeleted {
                customer_id: customer_id.clone(),
                reason: reason.trim().to_string(),
            })])
        }
        other => unreachable!("not a customer command: {}", other.name()),
    }
}

/// The customer, if it exists and is not deleted.
pub(super) fn live<'s>(
    state: &'s impl State,
    customer_id: &str,
) -> Result<&'s Customer, DomainError> {
    match state.customer(customer_id) {
        None => Err(DomainError::CustomerNotFound(customer_id.to_string())),
        Some(c) if c.deleted => Err(DomainError::CustomerDeleted(customer_id.to_string())),
        Some(c) => Ok(c),
    }
}

/// Folds one customer event into the state. Events of other aggregates leave it as is.
pub fn evolve(state: Option<Customer>, event: &Event) -> Customer {
    let mut c = state.unwrap_or_default();
    match event {
        Event::CustomerRegistered(e) => {
            c.name.clone_from(&e.name);
            c.email.clone_from(&e.email);
            c.address.clone_from(&e.address);
            c.deleted = false;
        }
        Event::CustomerRenamed(e) => c.name.clone_from(&e.name),
        Event::CustomerAddressChanged(e) => c.address.clone_from(&e.address),
        Event::CustomerDeleted(_) => c.deleted = true,
        _ => return c,
    }
    c.version += 1;
    c
}

/// The email index entries that change when a customer goes from `before` to `after`:
/// a live customer holds its email key; a deleted one frees it.
pub(super) fn index_changes(
    customer_id: &str,
    before: Option<&Customer>,
    after: &Customer,
) -> Vec<IndexChange> {
    let held = |c: &Customer| (!c.deleted).then(|| email_key(&c.email));
    let (was, is) = (before.and_then(held), held(after));
    if was == is {
        return Vec::new();
    }
    let mut changes = Vec::with_capacity(2);
    if let Some(key) = was {
        changes.push(IndexChange::remove(EMAILS, key.into_bytes()));
    }
    if let Some(key) = is {
        changes.push(IndexChange::put(
            EMAILS,
            key.into_bytes(),
            customer_id.as_bytes().to_vec(),
        ));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn registered(id: &str, email: &str) -> Event {
        Event::CustomerRegistered(pb::CustomerRegistered {
            customer_id: id.into(),
            name: format!("Name {id}"),
            email: email.into(),
            address: String::new(),
        })
    }

    fn deleted(id: &str) -> Event {
        Event::CustomerDeleted(pb::CustomerDeleted {
            customer_id: id.into(),
            reason: String::new(),
        })
    }

    #[test]
    fn register_emits_registered_with_trimmed_fields() {
        let events = Memory::default()
            .when(Command::RegisterCustomer {
                customer_id: "c1".into(),
                name: "  Ada ".into(),
                email: " Ada@Example.com ".into(),
                address: "1 Road".into(),
            })
            .unwrap();
        assert_eq!(
            events,
            [Event::CustomerRegistered(pb::CustomerRegistered {
                customer_id: "c1".into(),
                name: "Ada".into(),
                email: "Ada@Example.com".into(),
                address: "1 Road".into(),
            })]
        );
    }

    #[test]
    fn register_twice_is_already_exists() {
        let mut m = Memory::given([registered("c1", "a@x.io")]);
        assert_eq!(
            m.when(register("c1", "other@x.io")),
            Err(DomainError::CustomerExists("c1".into()))
        );
    }

    #[test]
    fn email_is_unique_case_insensitively_among_live_customers() {
        let mut m = Memory::given([registered("c1", "a@x.io")]);
        assert_eq!(
            m.when(register("c2", "A@X.IO")),
            Err(DomainError::EmailTaken {
                email: "A@X.IO".into(),
                customer_id: "c1".into()
            })
        );
    }

    #[test]
    fn deleting_frees_the_email() {
        let mut m = Memory::given([registered("c1", "a@x.io"), deleted("c1")]);
        assert!(m.when(register("c2", "a@x.io")).is_ok());
    }

    #[test]
    fn unknown_customer_is_not_found() {
        let mut m = Memory::default();
        for cmd in [
            Command::RenameCustomer {
                customer_id: "c9".into(),
                name: "n".into(),
            },
            Command::ChangeCustomerAddress {
                customer_id: "c9".into(),
                address: "a".into(),
            },
            Command::DeleteCustomer {
                customer_id: "c9".into(),
                reason: String::new(),
            },
        ] {
            assert_eq!(m.when(cmd), Err(DomainError::CustomerNotFound("c9".into())));
        }
    }

    #[test]
    fn deleted_customer_refuses_everything() {
        let mut m = Memory::given([registered("c1", "a@x.io"), deleted("c1")]);
        for cmd in [
            Command::RenameCustomer {
                customer_id: "c1".into(),
                name: "n".into(),
            },
            Command::ChangeCustomerAddress {
                customer_id: "c1".into(),
                address: "a".into(),
            },
            Command::DeleteCustomer {
                customer_id: "c1".into(),
                reason: String::new(),
            },
        ] {
            assert_eq!(m.when(cmd), Err(DomainError::CustomerDeleted("c1".into())));
        }
        // Registering the same id again is still refused: the stream exists.
        assert_eq!(
            m.when(register("c1", "new@x.io")),
            Err(DomainError::CustomerExists("c1".into()))
        );
    }

    #[test]
    fn rename_and_address_change() {
        let mut m = Memory::given([registered("c1", "a@x.io")]);
        m.when(Command::RenameCustomer {
            customer_id: "c1".into(),
            name: "Grace".into(),
        })
        .unwrap();
        m.when(Command::ChangeCustomerAddress {
            customer_id: "c1".into(),
            address: "2 Lane".into(),
        })
        .unwrap();
        let c = &m.customers()["c1"];
        assert_eq!(
            (c.name.as_str(), c.address.as_str(), c.version),
            ("Grace", "2 Lane", 3)
        );
    }
}
