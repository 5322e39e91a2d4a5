//! The last valid policy of each service, kept in the store so that it
//! outlives every control-plane replica.
//!
//! A policy written to the store by other means can fail validation. A
//! replica that saw a valid policy before keeps serving it, but one that
//! starts after the invalid write never saw one: without a record, every
//! sidecar that starts afresh would then get no policy at all (no timeouts,
//! no limits). So each replica records the newest valid policy it sees under
//! `services/<name>/last-valid-policy` (JSON: the policy key's revision and
//! the TOML source), and a replica that finds the stored policy invalid
//! serves the newer of the one it saw and the recorded one.
//!
//! Why a key of its own rather than reading the policy key's history (etcd
//! keeps old revisions): history is gone after a compaction, which
//! production clusters run every few minutes (`--auto-compaction-*`, or
//! [`crate::store::Store::compact`]), and the embedded store keeps none to
//! read; a key lives until it is deleted, in both stores alike.
//!
//! Several replicas may write the record. A write never moves it backwards
//! for long: a replica rewrites it whenever the policy it saw is newer than
//! the record, and a replica that deleted the policy's key deletes it.
//! Records older than the policy's last deletion are ignored.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::store::{ErrorChain, Revision, Store};

/// A valid policy and the revision of the write that stored it under the
/// policy key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PolicyVersion {
    pub revision: Revision,
    pub toml: Arc<str>,
}

/// The record's stored form.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    /// The revision of the policy key's write that stored the policy.
    revision: i64,
    /// The policy's TOML source.
    policy: String,
}

/// What the policy key holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Stored {
    #[default]
    Absent,
    Valid,
    /// Refused by validation.
    Invalid,
}

/// What the view knows of one service's policy key and of its record.
#[derive(Debug, Clone, Default)]
pub(crate) struct PolicyHistory {
    pub stored: Stored,
    /// When the policy key was last deleted: records older are void.
    deleted_at: Revision,
    /// The newest valid policy seen under the policy key.
    seen: Option<PolicyVersion>,
    /// The record key exists (whatever it holds).
    record_stored: bool,
    /// The record, when it holds a valid policy.
    recorded: Option<PolicyVersion>,
}

/// What a service's record needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RecordAction {
    Write(PolicyVersion),
    Delete,
}

impl PolicyHistory {
    /// The policy key holds a valid policy, stored at `version.revision`.
    pub fn stored_valid(&mut self, version: PolicyVersion) {
        self.stored = Stored::Valid;
        self.seen = Some(version);
    }

    /// The policy key holds a policy validation refused.
    pub fn stored_invalid(&mut self) {
        self.stored = Stored::Invalid;
    }

    /// The policy key was deleted at `revision`.
    pub fn deleted(&mut self, revision: Revision) {
        self.stored = Stored::Absent;
        self.deleted_at = revision;
        self.seen = None;
    }

    /// The record key was written (`Some`, its value) or deleted.
    pub fn record(&mut self, service: &str, value: Option<&[u8]>) {
        self.record_stored = value.is_some();
        self.recorded = value.and_then(|value| match parse_record(service, value) {
            Ok(version) => Some(version),
            Err(error) => {
                tracing::error!(service, %error, "ignoring an invalid last-valid-policy record");
                None
            }
        });
    }

    /// The newest valid policy known (seen or recorded) since the policy
    /// key was last deleted: what a refused policy falls back to.
    pub fn last_valid(&self) -> Option<&PolicyVersion> {
        [self.seen.as_ref(), self.recorded.as_ref()]
            .into_iter()
            .flatten()
            .filter(|v| v.revision > self.deleted_at)
            .max_by_key(|v| v.revision)
    }

    /// Nothing left to know: no policy key and no record.
    pub fn is_empty(&self) -> bool {
        self.stored == Stored::Absent && !self.record_stored
    }

    /// What the record must become: the newest valid policy when the record
    /// is older (or void), gone when the policy is.
    pub fn record_action(&self) -> Option<RecordAction> {
        if self.stored == Stored::Absent {
            return self.record_stored.then_some(RecordAction::Delete);
        }
        let newest = self.last_valid()?;
        match &self.recorded {
            Some(recorded)
                if recorded.revision >= newest.revision && recorded.revision > self.deleted_at =>
            {
                None
            }
            _ => Some(RecordAction::Write(newest.clone())),
        }
    }
}

fn parse_record(service: &str, value: &[u8]) -> Result<PolicyVersion, String> {
    let record: Record = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    let toml = super::validate_policy(service, record.policy.as_bytes())?;
    Ok(PolicyVersion {
        revision: Revision(record.revision),
        toml: toml.into(),
    })
}

/// Carries out `action` on `service`'s record; a failure is logged (the
/// caller tries again later).
pub(crate) async fn sync_record<S: Store>(store: &S, service: &str, action: &RecordAction) -> bool {
    let key = keys::last_valid_policy_key(service);
    let result = match action {
        RecordAction::Write(version) => {
            let record = Record {
                revision: version.revision.0,
                policy: version.toml.to_string(),
            };
            match serde_json::to_vec(&record) {
                Ok(value) => store.put(&key, Bytes::from(value), None).await.map(drop),
                Err(error) => {
                    tracing::error!(service, %error, "encoding the last-valid-policy record failed");
                    return true;
                }
            }
        }
        RecordAction::Delete => store.delete(&key).await.map(drop),
    };
    match result {
        Ok(()) => {
            tracing::debug!(service, ?action, "last-valid-policy record updated");
            true
        }
        Err(error) => {
            tracing::warn!(service, error = %ErrorChain(&error), "updating the last-valid-policy record failed; trying again later");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn version(revision: i64, toml: &str) -> PolicyVersion {
        PolicyVersion {
            revision: Revision(revision),
            toml: toml.into(),
        }
    }

    fn record(revision: i64, toml: &str) -> Vec<u8> {
        serde_json::to_vec(&Record {
            revision,
            policy: toml.into(),
        })
        .unwrap()
    }

    const A: &str = "service = \"billing\"\n";
    const B: &str = "service = \"billing\"\n[outbound]\ntimeout = \"1s\"\n";

    #[test]
    fn the_record_follows_the_newest_valid_policy_and_goes_with_it() {
        let mut h = PolicyHistory::default();
        h.stored_valid(version(5, A));
        assert_eq!(h.record_action(), Some(RecordAction::Write(version(5, A))));
        h.record("billing", Some(&record(5, A)));
        assert_eq!(h.record_action(), None);
        // An invalid write: the record stays, and is what is served.
        h.stored_invalid();
        assert_eq!(h.record_action(), None);
        assert_eq!(h.last_valid(), Some(&version(5, A)));
        // A replica that starts now knows only the record.
        let mut fresh = PolicyHistory::default();
        fresh.stored_invalid();
        fresh.record("billing", Some(&record(5, A)));
        assert_eq!(fresh.last_valid(), Some(&version(5, A)));
        assert_eq!(fresh.record_action(), None);
        // A lagging replica wrote an older record: it is rewritten.
        h.stored_valid(version(9, B));
        h.record("billing", Some(&record(5, A)));
        assert_eq!(h.record_action(), Some(RecordAction::Write(version(9, B))));
        // The policy is deleted: the record goes, and is void meanwhile.
        h.record("billing", Some(&record(9, B)));
        h.deleted(Revision(12));
        assert_eq!(h.record_action(), Some(RecordAction::Delete));
        h.stored_invalid();
        assert_eq!(h.last_valid(), None, "a record older than the deletion");
        h.record("billing", None);
        assert_eq!(h.record_action(), None);
    }

    #[test]
    fn an_invalid_record_is_ignored_and_rewritten() {
        let mut h = PolicyHistory::default();
        h.record("billing", Some(b"{not json"));
        h.stored_invalid();
        assert_eq!(h.last_valid(), None);
        h.record("billing", Some(&record(3, "service = \"orders\"\n")));
        assert_eq!(h.last_valid(), None, "a policy of another service");
        h.stored_valid(version(7, A));
        assert_eq!(h.record_action(), Some(RecordAction::Write(version(7, A))));
    }
}
