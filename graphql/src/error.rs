//! The API's errors: every error a client sees carries a stable `extensions.code`, a message that
//! says what was wrong and what to do. Library errors inside the hub map onto these at the edge.

use async_graphql::ErrorExtensions;

use crate::reader::ReadError;

/// Stable error codes, part of the API contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// An argument is malformed (bad cursor, bad selector, bad id).
    BadUserInput,
    /// A name breaks the naming rules (clusters and namespaces are DNS-1123 labels).
    InvalidName,
    /// The cluster, virtual machine or migration does not exist.
    NotFound,
    /// `first` is above the maximum page size or negative.
    PageTooLarge,
    /// The inventory database cannot be reached; retry later.
    DatabaseUnavailable,
    /// The request body or query text is too large.
    QueryTooLarge,
    /// The query nests deeper than allowed.
    QueryTooDeep,
    /// The query would cost more than allowed.
    QueryTooComplex,
    /// The query text is not valid GraphQL.
    ParseFailed,
    /// The query does not match the schema.
    ValidationFailed,
    /// The change is not safe in the fleet's current state; the message says why.
    Conflict,
    /// A migration's preflight checks failed; the message lists every reason.
    PreflightFailed,
    /// A bug or an unexpected failure on the hub; the hub's log has details.
    Internal,
    /// The request carried no valid credential.
    Unauthenticated,
    /// The caller's role does not allow this.
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadUserInput => "BAD_USER_INPUT",
            Self::InvalidName => "INVALID_NAME",
            Self::NotFound => "NOT_FOUND",
            Self::PageTooLarge => "PAGE_TOO_LARGE",
            Self::DatabaseUnavailable => "DATABASE_UNAVAILABLE",
            Self::QueryTooLarge => "QUERY_TOO_LARGE",
            Self::QueryTooDeep => "QUERY_TOO_DEEP",
            Self::QueryTooComplex => "QUERY_TOO_COMPLEX",
            Self::ParseFailed => "GRAPHQL_PARSE_FAILED",
            Self::ValidationFailed => "GRAPHQL_VALIDATION_FAILED",
            Self::Conflict => "CONFLICT",
            Self::PreflightFailed => "PREFLIGHT_FAILED",
            Self::Internal => "INTERNAL",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
        }
    }
}

/// An error a resolver returns: a code and a message for the client.
///
/// It deliberately does not implement `Display`: async-graphql converts any `Display` type into
/// an error without extensions, which would silently drop the code. The `From` below keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadUserInput, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Unavailable(detail) => {
                tracing::warn!(%detail, "inventory database unavailable");
                Self::new(
                    ErrorCode::DatabaseUnavailable,
                    "the inventory database is unavailable; the hub reconnects by itself, retry in a few seconds",
                )
            }
            ReadError::Internal(detail) => {
                tracing::error!(%detail, "inventory read failed");
                Self::new(
                    ErrorCode::Internal,
                    "reading the inventory failed unexpectedly; the hub's log has details",
                )
            }
        }
    }
}

impl From<crate::admin::AdminError> for ApiError {
    fn from(e: crate::admin::AdminError) -> Self {
        match e {
            crate::admin::AdminError::NotFound(m) => Self::not_found(m),
            crate::admin::AdminError::Conflict(m) => Self::new(ErrorCode::Conflict, m),
            crate::admin::AdminError::Invalid(m) => Self::bad_input(m),
            crate::admin::AdminError::Preflight(m) => Self::new(ErrorCode::PreflightFailed, m),
            crate::admin::AdminError::Read(e) => e.into(),
        }
    }
}

impl From<drover_shared::InvalidName> for ApiError {
    fn from(e: drover_shared::InvalidName) -> Self {
        Self::new(ErrorCode::InvalidName, e.to_string())
    }
}

impl ErrorExtensions for ApiError {
    fn extend(&self) -> async_graphql::Error {
        async_graphql::Error::new(self.message.clone())
            .extend_with(|_, e| e.set("code", self.code.as_str()))
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(e: ApiError) -> Self {
        e.extend()
    }
}

/// Gives every error in a response a stable code: errors the engine raised itself (parse,
/// validation, depth and complexity limits) come without one.
pub fn classify_response_errors(response: &mut async_graphql::Response) {
    for err in &mut response.errors {
        let has_code = err
            .extensions
            .as_ref()
            .is_some_and(|ext| ext.get("code").is_some());
        if has_code {
            continue;
        }
        let msg = err.message.as_str();
        let code = if msg.contains("nested too deep") {
            ErrorCode::QueryTooDeep
        } else if msg.contains("too complex") {
            ErrorCode::QueryTooComplex
        } else if msg.starts_with(" --> ") || msg.contains("expected") && err.path.is_empty() {
            ErrorCode::ParseFailed
        } else if err.path.is_empty() {
            ErrorCode::ValidationFailed
        } else {
            ErrorCode::Internal
        };
        if code == ErrorCode::QueryTooDeep || code == ErrorCode::QueryTooComplex {
            err.message
                .push_str("; ask for fewer nested levels or smaller pages (`first`)");
        }
        err.extensions
            .get_or_insert_with(Default::default)
            .set("code", code.as_str());
    }
}
