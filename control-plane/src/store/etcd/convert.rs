//! From etcd-client's types to the store's: keys (prefix stripped), values,
//! and errors.
//!
//! Error mapping is by gRPC status code first, then by etcd's message where
//! the code alone is ambiguous (etcd reports a missing lease as `NotFound`,
//! a too-large request as `InvalidArgument`, a compacted revision as
//! `OutOfRange`). Anything that may be transient (unavailable, timeout, no
//! leader, too many requests, transport failures) is `Unavailable`; refusals
//! (auth, permission, bad argument) are `Rejected`.

use bytes::Bytes;
use etcd_client::Error;
use tonic::Code;

use crate::store::{KeyValue, LeaseId, MAX_VALUE_BYTES, Revision, StoreError};

/// What the failed request was about, to fill in the error.
#[derive(Clone, Copy, Debug)]
pub(super) enum Op<'a> {
    Other,
    Put {
        key: &'a str,
        size: usize,
        lease: Option<LeaseId>,
    },
    Lease(LeaseId),
}

pub(super) fn map_error(error: Error, op: Op<'_>) -> StoreError {
    match error {
        Error::GRpcStatus(status) => map_status(status, op),
        Error::LeaseKeepAliveError(message) if message.contains("not found") => {
            lease_not_found(op).unwrap_or_else(|| StoreError::rejected(message))
        }
        Error::TransportError(_)
        | Error::IoError(_)
        | Error::WatchError(_)
        | Error::LeaseKeepAliveError(_) => StoreError::unavailable(error),
        _ => StoreError::rejected(error),
    }
}

fn map_status(status: tonic::Status, op: Op<'_>) -> StoreError {
    let message = status.message();
    match status.code() {
        Code::NotFound if message.contains("lease not found") => {
            lease_not_found(op).unwrap_or_else(|| StoreError::rejected(status))
        }
        Code::InvalidArgument if message.contains("too large") => match op {
            Op::Put { key, size, .. } => StoreError::TooLarge {
                key: key.to_owned(),
                size,
                limit: MAX_VALUE_BYTES,
            },
            _ => StoreError::rejected(status),
        },
        Code::OutOfRange if message.contains("compacted") => StoreError::Compacted {
            // etcd's message does not say which revision is the oldest left.
            compact_revision: Revision(0),
        },
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented => StoreError::rejected(status),
        // Unavailable, DeadlineExceeded, ResourceExhausted, Aborted,
        // Cancelled, and Unknown/Internal (how tonic reports broken
        // connections).
        _ => StoreError::unavailable(status),
    }
}

fn lease_not_found(op: Op<'_>) -> Option<StoreError> {
    match op {
        Op::Lease(lease)
        | Op::Put {
            lease: Some(lease), ..
        } => Some(StoreError::LeaseNotFound(lease)),
        _ => None,
    }
}

/// etcd's key/value as the store's, with `prefix` stripped from the key.
pub(super) fn key_value(kv: &etcd_client::KeyValue, prefix: &str) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: relative_key(kv.key(), prefix)?,
        value: Bytes::copy_from_slice(kv.value()),
        mod_revision: Revision(kv.mod_revision()),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

pub(super) fn relative_key(key: &[u8], prefix: &str) -> Result<String, StoreError> {
    let malformed = || StoreError::Malformed {
        key: String::from_utf8_lossy(key).into_owned(),
    };
    let key = std::str::from_utf8(key).map_err(|_| malformed())?;
    key.strip_prefix(prefix)
        .map(str::to_owned)
        .ok_or_else(malformed)
}

/// The end of etcd's key range for every key starting with `prefix`: the
/// prefix with its last byte below 0xff incremented, or `\0` (no end).
pub(super) fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_ends() {
        assert_eq!(prefix_range_end(b"/weft/"), b"/weft0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b""), vec![0]);
    }

    #[test]
    fn statuses_map_to_store_errors() {
        let lease = LeaseId(7);
        let status = |code, msg: &str| Error::GRpcStatus(tonic::Status::new(code, msg));
        assert!(matches!(
            map_error(status(Code::NotFound, "etcdserver: requested lease not found"), Op::Lease(lease)),
            StoreError::LeaseNotFound(l) if l == lease
        ));
        assert!(matches!(
            map_error(
                status(Code::InvalidArgument, "etcdserver: request is too large"),
                Op::Put {
                    key: "k",
                    size: 9,
                    lease: None
                }
            ),
            StoreError::TooLarge { size: 9, .. }
        ));
        assert!(matches!(
            map_error(
                status(Code::Unavailable, "etcdserver: no leader"),
                Op::Other
            ),
            StoreError::Unavailable { .. }
        ));
        assert!(matches!(
            map_error(
                status(Code::PermissionDenied, "etcdserver: permission denied"),
                Op::Other
            ),
            StoreError::Rejected { .. }
        ));
        assert!(matches!(
            map_error(
                Error::LeaseKeepAliveError("lease not found".to_owned()),
                Op::Lease(lease)
            ),
            StoreError::LeaseNotFound(_)
        ));
    }

    #[test]
    fn keys_outside_the_prefix_or_not_utf8_are_malformed() {
        assert_eq!(
            relative_key(b"/weft/a/b", "/weft/").ok().as_deref(),
            Some("a/b")
        );
        assert!(matches!(
            relative_key(b"/other", "/weft/"),
            Err(StoreError::Malformed { .. })
        ));
        assert!(matches!(
            relative_key(b"/weft/\xff", "/weft/"),
            Err(StoreError::Malformed { .. })
        ));
    }
}
