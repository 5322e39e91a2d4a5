//! The mechanics of retrying an outbound request; the outbound path decides when
//! to call them (and charges each retry to the retry budget).
//!
//! - [`classify`]: what happened to one attempt ([`Outcome`]), and whether the
//!   route's `retry` policy allows another try for it. A route with `attempts = 0`
//!   never retries. A connect failure (listed as `connect-failure`) and an HTTP/2
//!   REFUSED_STREAM (listed as `refused-stream`) may be retried for any method:
//!   the application never saw the request. Everything else is retried only for
//!   idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) unless the policy
//!   sets `non_idempotent`: a reset needs `reset` (which also covers a refused
//!   stream), a per-try timeout needs `reset`, `5xx` or `504`, and a response
//!   needs `5xx` (for 500 to 599), its exact status, or its `grpc-status` code.
//! - [`mod@backoff`]: how long to wait before retry number `n`: a random duration
//!   between `backoff.min` and `min * 2^(n-1)`, capped at `backoff.max`.
//! - [`budget`]: the retry budget, retries as a ratio of the requests of a
//!   sliding window plus a reserve, counted so the bound holds over every ttl.
//! - [`replay`]: the request body buffered (up to `max_replay_body`) so it can be
//!   sent again; a longer body is streamed once and the request is not retried.
//!
//! Nothing here sleeps, sends or counts: these are pure decisions and body
//! plumbing, each tested on its own.

pub mod backoff;
pub mod budget;
pub mod classify;
pub mod replay;

pub use self::backoff::backoff;
pub use self::budget::RetryBudget;
pub use self::classify::{
    Outcome, classify_error, grpc_status, is_failure, is_idempotent, retryable,
};
pub use self::replay::{BodyError, Replay, RequestBody, prepare};
