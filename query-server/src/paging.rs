//! List pagination: opaque page tokens (the last index key returned, bound to the
//! request's filters) and one page walked over a store index.

use crate::error::QueryError;
use crate::store::{Store, StoreError};
use base64::Engine;
use prost::Message;

/// Page size when none is asked for, and the most one page may hold.
pub const PAGE_SIZE_DEFAULT: usize = 50;
pub const PAGE_SIZE_MAX: usize = 500;
/// Index entries one list request may examine (filters can reject many).
const SCAN_BUDGET: usize = 5_000;

/// What a page token remembers.
#[derive(Clone, PartialEq, prost::Message)]
struct PageToken {
    /// Last index key returned.
    #[prost(bytes = "vec", tag = "1")]
    after: Vec<u8>,
    /// The request's filter, which must not change between pages.
    #[prost(string, tag = "2")]
    filter: String,
}

fn bad_token(description: &str) -> QueryError {
    QueryError::bad("page_token", description)
}

/// The token that continues a list after index key `after`.
pub fn encode_token(after: &[u8], filter: &str) -> String {
    let token = PageToken {
        after: after.to_vec(),
        filter: filter.to_string(),
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.encode_to_vec())
}

/// The index key to continue after (`None` for the first page), or INVALID_ARGUMENT on
/// `page_token` when the token is not one this server issued for these filters and this
/// index (`prefix`).
pub fn decode_token(
    token: &str,
    filter: &str,
    prefix: &[u8],
) -> Result<Option<Vec<u8>>, QueryError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad_token("not a token this server issued"))?;
    let token = PageToken::decode(bytes.as_slice())
        .map_err(|_| bad_token("not a token this server issued"))?;
    if token.filter != filter {
        return Err(bad_token("was issued for a request with other filters"));
    }
    if !token.after.starts_with(prefix) {
        return Err(bad_token("not a token this server issued"));
    }
    Ok(Some(token.after))
}

/// The page size to serve for a requested one (0: the default).
pub fn page_size(requested: u32) -> usize {
    match usize::try_from(requested) {
        Ok(0) | Err(_) => PAGE_SIZE_DEFAULT,
        Ok(n) => n.min(PAGE_SIZE_MAX),
    }
}

/// One page over an index: items `fetch(key, value)` accepts, and the key to continue
/// after.
pub fn paginate<T>(
    store: &Store,
    prefix: &[u8],
    end: Option<&[u8]>,
    after: Option<Vec<u8>>,
    size: usize,
    mut fetch: impl FnMut(&[u8], &[u8]) -> Result<Option<T>, StoreError>,
) -> Result<(Vec<T>, Option<Vec<u8>>), StoreError> {
    let mut items = Vec::with_capacity(size);
    let mut cursor = after;
    let mut scanned = 0;
    loop {
        let chunk = store.scan_index(prefix, cursor.as_deref(), 256)?;
        if chunk.is_empty() {
            return Ok((items, None));
        }
        for (key, value) in chunk {
            if end.is_some_and(|end| key.as_ref() >= end) {
                return Ok((items, None));
            }
            if items.len() == size || scanned == SCAN_BUDGET {
                // There is at least this one more entry: continue after the last one.
                return Ok((items, cursor));
            }
            scanned += 1;
            if let Some(item) = fetch(&key, &value)? {
                items.push(item);
            }
            cursor = Some(key.to_vec());
        }
    }
}
