//! Why a query was not answered, and the one place that decides which gRPC status each
//! reason becomes (reasons in `google.rpc.ErrorInfo`, like the command side).

use shop_shared::grpc::{invalid_argument, storage_unavailable, with_reason, FieldViolation};
use tonic::{Code, Status};

use crate::as_of::Cutoff;
use crate::projections::View;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// INVALID_ARGUMENT, with a BadRequest naming each field.
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    /// NOT_FOUND, reason `<VIEW>_NOT_FOUND` (e.g. ORDER_NOT_FOUND).
    #[error("{name} {id:?} {verb}", verb = match .as_of { None => "does not exist".to_string(), Some(when) => format!("did not exist {when}") })]
    NotFound {
        name: &'static str,
        reason: &'static str,
        field: &'static str,
        id: String,
        /// The cut-off of an as-of read, described.
        as_of: Option<String>,
    },
    /// NOT_FOUND, reason STREAM_NOT_FOUND.
    #[error("stream {0} has no events")]
    StreamNotFound(String),
    /// UNAVAILABLE, reason NOT_APPLIED: `min_position` was not reached in time.
    #[error(
        "the query server has applied events up to position {applied}; position {wanted} is not applied yet \
         ({} behind after waiting {waited_ms} ms{}); retry later",
        wanted.saturating_sub(*applied),
        consumer.as_ref().map(|e| format!("; consumer: {e}")).unwrap_or_default()
    )]
    NotApplied {
        applied: u64,
        wanted: u64,
        waited_ms: u128,
        consumer: Option<String>,
    },
    /// RESOURCE_EXHAUSTED, reason OVERLOADED.
    #[error("too many watchers ({0}); try again later")]
    TooManyWatchers(usize),
    /// UNAVAILABLE.
    #[error("the query server is shutting down")]
    ShuttingDown,
    /// UNAVAILABLE, reason STORAGE_UNAVAILABLE (as on the command server).
    #[error("the view store could not be read: {0}")]
    Store(#[from] StoreError),
    /// INTERNAL: a bug (e.g. a descriptor missing from the binary).
    #[error("{0}")]
    Internal(&'static str),
}

impl QueryError {
    /// One bad field.
    pub fn bad(field: &str, description: impl Into<String>) -> Self {
        QueryError::Invalid(vec![FieldViolation::new(field, description)])
    }

    /// A `V` that does not exist (as of `cut`, for as-of reads).
    pub fn not_found<V: View>(id: &str, cut: Option<Cutoff>) -> Self {
        QueryError::NotFound {
            name: V::NAME,
            reason: V::NOT_FOUND,
            field: V::ID_FIELD,
            id: id.to_string(),
            as_of: cut.map(|c| c.describe()),
        }
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Status {
        let message = error.to_string();
        match error {
            QueryError::Invalid(violations) => invalid_argument(&violations),
            QueryError::NotFound {
                reason, field, id, ..
            } => with_reason(Code::NotFound, reason, message, &[(field, id)]),
            QueryError::StreamNotFound(stream) => with_reason(
                Code::NotFound,
                "STREAM_NOT_FOUND",
                message,
                &[("stream_id", stream)],
            ),
            QueryError::NotApplied {
                applied, wanted, ..
            } => with_reason(
                Code::Unavailable,
                "NOT_APPLIED",
                message,
                &[
                    ("applied_position", applied.to_string()),
                    ("min_position", wanted.to_string()),
                ],
            ),
            QueryError::TooManyWatchers(max) => with_reason(
                Code::ResourceExhausted,
                "OVERLOADED",
                message,
                &[("watchers_max", max.to_string())],
            ),
            QueryError::ShuttingDown => Status::unavailable(message),
            QueryError::Store(error) => {
                tracing::error!(%error, "store read failed");
                storage_unavailable("the view store could not be read")
            }
            QueryError::Internal(what) => {
                tracing::error!(what, "query failed on a bug");
                Status::internal(message)
            }
        }
    }
}
