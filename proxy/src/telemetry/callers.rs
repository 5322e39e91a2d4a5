//! The `caller` label of the request metrics: who called, with a bounded
//! number of distinct values.
//!
//! An inbound request's caller is the one `inbound.caller_rate_limit` counts
//! it against ([`weft_stack::rate_limit::caller`]): over mTLS the service its
//! client certificate names, else the `weft-caller` header (unverified), else
//! `anonymous`. An outbound request's caller is this sidecar's own `[service]
//! name` (empty without one), so an edge reads the same from either side.
//!
//! Every distinct caller is a series of its own in each request family, and
//! plaintext callers choose their `weft-caller`: [`Callers`] shows at most
//! `[telemetry] max_callers` of them (the first seen; `anonymous` is not
//! counted) and counts every later one as [`OTHER`], which
//! `weft_callers_folded_total` counts (distinct names, up to [`MAX_FOLDED`]).
//!
//! The labels are interned: one `Arc<str>` per caller, whose address keys the
//! request's series in [`super::series`], so a known caller costs no
//! allocation. Over mTLS the caller is fixed for the connection, so the
//! inbound observer resolves it once per connection; a plaintext request
//! costs one lookup of its header's text.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::metrics::counter::Counter;
use weft_stack::rate_limit::ANONYMOUS;

/// The label of the callers past `max_callers`.
pub const OTHER: &str = "other";
/// Distinct folded callers remembered (to count each once); past it, every
/// new one is counted again.
pub const MAX_FOLDED: usize = 10_000;

/// The interned caller labels of one sidecar.
#[derive(Debug)]
pub struct Callers {
    max: usize,
    shown: RwLock<HashSet<Arc<str>>>,
    /// Hashes of the names folded into [`OTHER`], to count each once.
    folded: RwLock<HashSet<u64>>,
    hasher: RandomState,
    anonymous: Arc<str>,
    other: Arc<str>,
    own: Arc<str>,
    folded_total: Counter,
}

impl Callers {
    /// At most `max` named callers; outbound requests are labelled `own`.
    pub fn new(max: usize, own: &str, folded_total: Counter) -> Self {
        Self {
            max,
            shown: RwLock::default(),
            folded: RwLock::default(),
            hasher: RandomState::new(),
            anonymous: Arc::from(ANONYMOUS),
            other: Arc::from(OTHER),
            own: Arc::from(own),
            folded_total,
        }
    }

    /// The label of outbound requests: this sidecar's `[service] name`.
    pub fn own(&self) -> &Arc<str> {
        &self.own
    }

    /// The label of `caller`: its interned name, or [`OTHER`] once `max`
    /// names are shown.
    pub fn label(&self, caller: &str) -> Arc<str> {
        if caller == ANONYMOUS {
            return Arc::clone(&self.anonymous);
        }
        if let Some(known) = self
            .shown
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(caller)
        {
            return Arc::clone(known);
        }
        let hash = self.hasher.hash_one(caller);
        if self
            .folded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&hash)
        {
            return Arc::clone(&self.other);
        }
        {
            let mut shown = self.shown.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(known) = shown.get(caller) {
                return Arc::clone(known);
            }
            if shown.len() < self.max {
                let label: Arc<str> = Arc::from(caller);
                shown.insert(Arc::clone(&label));
                return label;
            }
        }
        let mut folded = self.folded.write().unwrap_or_else(PoisonError::into_inner);
        if folded.len() < MAX_FOLDED {
            if folded.insert(hash) {
                self.folded_total.inc();
            }
        } else {
            self.folded_total.inc();
        }
        Arc::clone(&self.other)
    }

    /// Named callers shown so far.
    pub fn shown(&self) -> usize {
        self.shown
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_past_the_cap_fold_into_other_and_are_counted_once() {
        let folded = Counter::default();
        let callers = Callers::new(2, "checkout", folded.clone());
        assert_eq!(&**callers.own(), "checkout");
        let a = callers.label("a");
        assert!(Arc::ptr_eq(&a, &callers.label("a")), "interned");
        let anonymous = callers.label(ANONYMOUS);
        assert_eq!(&*anonymous, "anonymous");
        assert_eq!(&*callers.label("b"), "b");
        assert_eq!(callers.shown(), 2, "anonymous is not counted");
        assert_eq!(&*callers.label("c"), OTHER);
        assert_eq!(&*callers.label("c"), OTHER);
        assert_eq!(&*callers.label("d"), OTHER);
        assert_eq!(folded.get(), 2, "distinct names folded");
        assert_eq!(&*callers.label("a"), "a", "a shown caller stays shown");
        assert_eq!(&*callers.label(ANONYMOUS), "anonymous");
    }
}
