//! `page_token`: list page tokens as a client may send them, for every index.

use query_server::paging::{decode_token, encode_token, page_size, PAGE_SIZE_MAX};
use query_server::projections::{customers, orders, products};
use query_server::store::Store;
use shop_shared::pb;
use tonic::{Code, Status};

/// The index prefixes the list RPCs page over.
fn prefix(selector: u8) -> Vec<u8> {
    match selector % 6 {
        0 => orders::ALL.to_vec(),
        1 => orders::by_customer_prefix("c1"),
        2 => orders::by_status_prefix(pb::OrderStatus::Paid),
        3 => customers::by_name_prefix("ann"),
        4 => products::BY_AVAILABLE.to_vec(),
        _ => Store::rows_prefix::<pb::Product>(),
    }
}

/// Input: a selector byte (the index), then the filter and the token separated by the
/// first NUL. Checks what `decode_token` accepts, and that every key it could issue
/// decodes back to itself.
pub fn page_token(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let prefix = prefix(selector);
    let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let filter = String::from_utf8_lossy(&rest[..split]);
    let token = String::from_utf8_lossy(rest.get(split + 1..).unwrap_or_default());
    match decode_token(&token, &filter, &prefix) {
        Ok(None) => assert!(token.is_empty()),
        Ok(Some(after)) => {
            assert!(after.starts_with(&prefix), "a token escaped its index");
        }
        Err(error) => {
            assert_eq!(Status::from(error).code(), Code::InvalidArgument);
        }
    }
    let mut after = prefix.clone();
    after.extend_from_slice(token.as_bytes());
    let issued = encode_token(&after, &filter);
    assert_eq!(
        decode_token(&issued, &filter, &prefix).ok(),
        Some(Some(after))
    );
    let other = format!("{filter}+");
    assert!(decode_token(&issued, &other, &prefix).is_err());
    let size = page_size(u32::from_le_bytes([selector, 0, 0, rest.len() as u8]));
    assert!((1..=PAGE_SIZE_MAX).contains(&size));
}
