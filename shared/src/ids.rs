//! Identifiers: their syntax, and the stream ids built from them.
//!
//! Ids are client-chosen strings matching `[A-Za-z0-9_-]{1,64}`, which makes them safe as
//! NATS subject tokens and as sled key parts (no NUL byte, no `.`, no `*`/`>`).

use std::fmt;

/// Longest id accepted.
pub const ID_LEN_MAX: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {ID_LEN_MAX} characters")]
    TooLong,
    #[error("may contain only letters, digits, '_' and '-'")]
    BadCharacter,
}

/// Checks that `id` matches `[A-Za-z0-9_-]{1,64}`.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > ID_LEN_MAX {
        return Err(IdError::TooLong);
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

/// A new server-generated id: a UUIDv7 (time-ordered), which matches the id syntax.
pub fn generate_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The aggregate kinds; each has its own stream prefix and subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKind {
    Customer,
    Product,
    Order,
    Shipment,
}

impl StreamKind {
    /// Every kind.
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Customer,
        StreamKind::Product,
        StreamKind::Order,
        StreamKind::Shipment,
    ];

    /// The prefix of the stream id and the subject token: `customer`, `product`,
    /// `order`, `shipment`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Customer => "customer",
            StreamKind::Product => "product",
            StreamKind::Order => "order",
            StreamKind::Shipment => "shipment",
        }
    }
}

/// A stream (aggregate instance): its kind and the aggregate's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    pub kind: StreamKind,
    pub id: String,
}

impl StreamId {
    pub fn customer(id: impl Into<String>) -> Self {
        StreamId {
            kind: StreamKind::Customer,
            id: id.into(),
        }
    }

    pub fn product(sku: impl Into<String>) -> Self {
        StreamId {
            kind: StreamKind::Product,
            id: sku.into(),
        }
    }

    pub fn order(id: impl Into<String>) -> Self {
        StreamId {
            kind: StreamKind::Order,
            id: id.into(),
        }
    }

    pub fn shipment(id: impl Into<String>) -> Self {
        StreamId {
            kind: StreamKind::Shipment,
            id: id.into(),
        }
    }

    /// Parses `<kind>-<id>`: `customer-<id>`, `product-<sku>`, `order-<id>`, ...
    pub fn parse(s: &str) -> Result<Self, StreamIdError> {
        let (prefix, id) = s.split_once('-').ok_or(StreamIdError::NoPrefix)?;
        let kind = StreamKind::ALL
            .into_iter()
            .find(|k| k.as_str() == prefix)
            .ok_or(StreamIdError::NoPrefix)?;
        validate_id(id).map_err(StreamIdError::BadId)?;
        Ok(StreamId {
            kind,
            id: id.to_string(),
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.kind.as_str(), self.id)
    }
}

/// Why a string is not a stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamIdError {
    #[error("must start with 'customer-', 'product-', 'order-' or 'shipment-'")]
    NoPrefix,
    #[error("id part {0}")]
    BadId(IdError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert_eq!(validate_id("a"), Ok(()));
        assert_eq!(validate_id("Abc_09-x"), Ok(()));
        assert_eq!(validate_id(&"x".repeat(64)), Ok(()));
        assert_eq!(validate_id(&generate_id()), Ok(()));
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(validate_id(&"x".repeat(65)), Err(IdError::TooLong));
        for bad in ["a.b", "a b", "a*", ">", "é", "a\0b", "a/b"] {
            assert_eq!(validate_id(bad), Err(IdError::BadCharacter), "{bad:?}");
        }
    }

    #[test]
    fn stream_ids_round_trip() {
        let s = StreamId::order("o-1");
        assert_eq!(s.to_string(), "order-o-1");
        assert_eq!(StreamId::parse("order-o-1"), Ok(s));
        assert_eq!(StreamId::parse("order"), Err(StreamIdError::NoPrefix));
        assert_eq!(StreamId::parse("cart-1"), Err(StreamIdError::NoPrefix));
        assert_eq!(
            StreamId::parse("product-"),
            Err(StreamIdError::BadId(IdError::Empty))
        );
    }

    proptest! {
        #[test]
        fn valid_ids_are_single_subject_tokens(id in "[A-Za-z0-9_-]{1,64}") {
            prop_assert!(validate_id(&id).is_ok());
            let subject = crate::subjects::subject(StreamKind::Customer, &id);
            prop_assert_eq!(subject.split('.').count(), 4);
        }
    }
}
