//! What the sidecar tells operators: metrics (`/metrics`), and the one place a
//! finished request is reported ([`observe`]).
//!
//! | module | responsibility |
//! |---|---|
//! | [`metrics`] | the Prometheus registry and every metric (names: `docs/telemetry.md`) |
//! | [`observe`] | one request's observation, finished when its response body ends |
//! | [`io`] | byte and connection counting on the listeners' client connections |

pub mod io;
pub mod metrics;
pub mod observe;

use std::sync::{Arc, LazyLock};

pub use metrics::{Direction, Metrics, RetrySkipped};
pub use observe::Observation;

/// The `service` label of outbound requests to names resolved through DNS and
/// to IP literals (a bounded label whatever hosts the app calls).
pub static EXTERNAL: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("external"));
/// The `service` label of requests whose service is not known.
pub static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("unknown"));
/// The `limit` label of refusals that no configured limit made.
pub static NO_LIMIT: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

/// The `route` label of a request that matched no route.
pub fn no_route() -> &'static Arc<str> {
    crate::route::RouteTable::no_route()
}
