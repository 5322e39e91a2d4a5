//! The policies the chaos run applies: valid ones, and invalid ones that
//! must never be in force.
//!
//! Every valid policy keeps what the run relies on (a whole-request timeout
//! and a per-try timeout, so a request to a paused instance is retried
//! elsewhere; the `slow` route's concurrency cap and bounded queue, which
//! define a service's capacity for the overload case) and varies only the
//! load balancer between `p2c-ewma` and `least-request`. Every invalid
//! policy says `load_balancer = "round-robin"`, which no valid one does:
//! a sidecar that ever shows `round-robin` for a service in `/endpoints`
//! has an invalid policy in force.

/// The load balancer only invalid policies name.
pub const INVALID_MARKER: &str = "round-robin";

/// Requests in flight per instance on the `slow` route.
pub const SLOW_MAX_CONCURRENCY: u32 = 2;

/// The `slow` route's cap and queue, and the timeouts every valid policy has.
const COMMON: &str = r#"timeout = "4s"
per_try_timeout = "1s"

[[routes]]
name = "slow"
match = { path_prefix = "/slow" }
max_concurrency = 2
queue = { depth = 2, timeout = "50ms" }
"#;

/// Valid policy number `n` of `service` (the balancer alternates with `n`;
/// a comment names `n`, so applying a new number always writes).
pub fn valid(service: &str, n: usize) -> String {
    let balancer = if n.is_multiple_of(2) {
        "p2c-ewma"
    } else {
        "least-request"
    };
    format!(
        "# chaos policy #{n}\nservice = {service:?}\n\n[outbound]\nload_balancer = {balancer:?}\n{COMMON}"
    )
}

/// Invalid policy number `n` of `service`: an unknown key, a malformed
/// duration, or a value out of range, each beside the marker balancer.
pub fn invalid(service: &str, n: usize) -> String {
    let mistake = match n % 3 {
        0 => "no_such_key = true",
        1 => "connect_timeout = \"2 s\"",
        _ => "endpoint_max_concurrency = 0",
    };
    format!(
        "service = {service:?}\n\n[outbound]\nload_balancer = {INVALID_MARKER:?}\n{mistake}\n{COMMON}"
    )
}

/// The etcd key of `service`'s policy (the control plane's default prefix).
pub fn etcd_key(service: &str) -> String {
    format!("/weft/services/{service}/policy")
}
