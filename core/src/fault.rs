//! A route's fault injection, compiled: what share of its requests are
//! delayed, and what share answered with an injected status, rolled once per
//! request.
//!
//! Only compiled where faults are permitted (the policy's `allow_faults`,
//! which the control plane writes for `weftctl apply --allow-faults` and
//! the sidecar sets from its bootstrap for local files); see
//! [`crate::policy::OutboundPolicy::new`]. The fault layer
//! (`weft_stack::fault`) applies it.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use weft_config::Fault;

/// `routes[].fault`, compiled.
#[derive(Debug)]
pub struct FaultPlan {
    /// The delay and the share (0 to 1) of requests held that long.
    pub delay: Option<(Duration, f64)>,
    /// The status and the share (0 to 1) of requests answered with it.
    pub abort: Option<(StatusCode, f64)>,
    /// `routes.<name>.fault`, the `weft-limit` of an injected abort.
    pub limit: Arc<str>,
}

/// What one request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injection {
    pub delay: Option<Duration>,
    pub abort: Option<StatusCode>,
}

impl FaultPlan {
    pub fn new(route: &str, fault: &Fault) -> Arc<Self> {
        Arc::new(Self {
            delay: fault.delay().map(|(delay, share)| (delay.get(), share)),
            abort: fault
                .abort()
                .and_then(|(status, share)| Some((StatusCode::from_u16(status).ok()?, share))),
            limit: Arc::from(format!("routes.{route}.fault")),
        })
    }

    /// Rolls the dice for one request (`roll` draws from 0 to 1).
    pub fn inject_with(&self, mut roll: impl FnMut() -> f64) -> Injection {
        let hit = |share: f64, roll: &mut dyn FnMut() -> f64| share >= 1.0 || roll() < share;
        Injection {
            delay: self
                .delay
                .filter(|(_, share)| hit(*share, &mut roll))
                .map(|(delay, _)| delay),
            abort: self
                .abort
                .filter(|(_, share)| hit(*share, &mut roll))
                .map(|(status, _)| status),
        }
    }

    /// Rolls the dice for one request.
    pub fn inject(&self) -> Injection {
        self.inject_with(rand::random::<f64>)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan(delay: Option<f64>, abort: Option<f64>) -> Arc<FaultPlan> {
        FaultPlan::new(
            "pay",
            &Fault {
                delay: delay.map(|_| weft_config::Duration::from_millis(200)),
                delay_percent: delay,
                abort: abort.map(|_| 503),
                abort_percent: abort,
            },
        )
    }

    #[test]
    fn shares_decide_per_request() {
        let all = plan(Some(100.0), Some(100.0));
        assert_eq!(all.limit.as_ref(), "routes.pay.fault");
        let every = all.inject_with(|| 0.999_999);
        assert_eq!(every.delay, Some(Duration::from_millis(200)));
        assert_eq!(every.abort, Some(StatusCode::SERVICE_UNAVAILABLE));
        let some = plan(Some(5.0), Some(1.0));
        assert_eq!(
            some.inject_with(|| 0.04),
            Injection {
                delay: Some(Duration::from_millis(200)),
                abort: None,
            }
        );
        assert_eq!(some.inject_with(|| 0.5), Injection::default());
        let none = plan(Some(0.0), None);
        assert_eq!(none.inject_with(|| 0.0), Injection::default());
        // Over many requests, about the share.
        let aborted = (0..10_000)
            .filter(|_| plan(None, Some(10.0)).inject().abort.is_some())
            .count();
        assert!((700..1300).contains(&aborted), "{aborted}");
    }
}
