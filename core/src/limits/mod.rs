//! Request limits: rate limits and concurrency caps.
//!
//! Two kinds of limit, each in its own file:
//!
//! - [`rate`]: how many requests per second may start. A GCRA (a token bucket
//!   without a refill task) built on governor: `per_second` sustained, `burst`
//!   at once. [`RateLimit`] is one bucket for everything that goes through it;
//!   [`CallerRateLimit`] keeps one bucket per caller identity, with overrides
//!   for named callers. A check never waits: it admits or refuses at once.
//! - [`concurrency`]: how many requests may be in flight at once.
//!   [`ConcurrencyLimit`] is one semaphore shared by every request that goes
//!   through it, optionally with a bounded queue whose waits have a deadline.
//!   Its [`ConcurrencyPermit`] is held until the response body ends.
//!
//! Where the proxy applies them. Inbound (other sidecars calling the local
//! app): the service-wide rate limit (`inbound.rate_limit`, and per route
//! `routes.<name>.rate_limit`), which every instance of the service enforces
//! at its [`Share`] so that together they admit about the configured rate;
//! per-caller limits (`inbound.caller_rate_limit`); and per-instance
//! concurrency caps (`inbound.max_concurrency`, `routes.<name>.max_concurrency`)
//! with their queues. Outbound (the local app calling other services): the
//! service limit of this one caller sidecar (`outbound.rate_limit`) and caps per
//! endpoint.
//!
//! - [`adaptive`]: a concurrency limit that follows measured latency
//!   (`outbound.adaptive_concurrency` per endpoint, `inbound.adaptive_concurrency`
//!   per instance), a gradient limiter in the spirit of Gradient2.
//! - [`cold_start`]: how many calls to a service with no endpoint may wait
//!   for its first instance, and for how long (`outbound.cold_start`), and
//!   when its activator is due. [`ColdStartGate`] is shared by every request
//!   to the service; its [`HeldSlot`] is held while a call waits.
//!
//! Every refusal ([`RateLimited`], [`ConcurrencyCapped`]) carries the name of
//! the limit that refused, which is its policy key path (for example
//! `inbound.rate_limit` or `routes.charge.max_concurrency`). The proxy returns
//! it in the `weft-limit` response header so an operator can tell which setting
//! to look at. Nothing here maps refusals to HTTP: that is `error`'s job.

pub mod adaptive;
pub mod cold_start;
pub mod concurrency;
pub mod rate;

pub use adaptive::{AdaptiveConcurrency, AdaptivePermit, EndpointCap, GradientLimit};
pub use cold_start::{ColdStartGate, ColdStartRefused, HeldSlot};
pub use concurrency::{ConcurrencyCapped, ConcurrencyLimit, ConcurrencyPermit};
pub use rate::{CallerRateLimit, MAX_TRACKED_CALLERS, RateLimit, RateLimited, Share};
