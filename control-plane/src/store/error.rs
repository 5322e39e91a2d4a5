//! [`StoreError`]: every way a store operation fails, typed where it starts.
//!
//! Both stores map their failures onto these variants so that callers decide
//! with one match: retry later ([`StoreError::is_retryable`]), re-list after
//! `Compacted`, re-register after `LeaseNotFound`, or report the rest.

use super::{LeaseId, Revision};

/// A boxed error kept as the source of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time (network,
    /// timeout, no leader). Retrying later may succeed.
    #[error("store unavailable")]
    Unavailable {
        #[source]
        source: BoxError,
    },
    /// The history needed to resume a watch is gone: it was compacted away,
    /// or the watcher fell too far behind. List again and watch from the
    /// list's revision.
    #[error("store history before revision {compact_revision} is compacted")]
    Compacted {
        /// The oldest revision the store can still replay from (0 when etcd
        /// did not say, as for a listing that kept being compacted).
        compact_revision: Revision,
    },
    /// The lease expired, was revoked, or never existed.
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The request exceeds the store's size limit; refused before it is sent.
    #[error("{size} bytes for key {key:?} exceed the store limit of {limit} bytes")]
    TooLarge {
        key: String,
        size: usize,
        limit: usize,
    },
    /// The store refused the request: bad credentials, missing permission,
    /// an invalid argument such as an empty key or a future revision.
    #[error("store refused the request")]
    Rejected {
        #[source]
        source: BoxError,
    },
    /// A key under the prefix is not UTF-8: someone other than Weft wrote it.
    #[error("key under the store prefix is not UTF-8: {key:?}")]
    Malformed { key: String },
}

impl StoreError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    pub(crate) fn unavailable(source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable {
            source: source.into(),
        }
    }

    pub(crate) fn rejected(source: impl Into<BoxError>) -> Self {
        StoreError::Rejected {
            source: source.into(),
        }
    }
}

/// Displays an error with all its sources, `outer: inner: root`, for logs
/// and one-line reports.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
