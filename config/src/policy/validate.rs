//! Rules across keys of a policy file, checked after it deserializes.
//!
//! Each rule returns the first [`Problem`] it finds, addressed by key path so
//! the error quotes the offending line: the second of two routes with one
//! name, the split that pushes the total weight over 100, the `queue` with no
//! `max_concurrency` beside it.

use std::collections::HashMap;
use std::num::NonZeroU32;

use super::{AdaptiveConcurrency, Method, Policy, Queue};
use crate::diag::{KeyPath, Problem};
use crate::duration::Duration;
use crate::identity::CallerId;

impl Policy {
    /// Checks every cross-key rule of the policy file.
    pub(crate) fn validate(&self) -> Result<(), Problem> {
        let inbound = KeyPath::new(["inbound"]);
        check_allow(&inbound, self.inbound.allow.as_deref())?;
        check_queue(
            &inbound,
            self.inbound.max_concurrency,
            self.inbound.queue.as_ref(),
        )?;

        let outbound = KeyPath::new(["outbound"]);
        let out = &self.outbound;
        check_timeouts(&outbound, "outbound", out.timeout, out.per_try_timeout)?;
        if out.outlier.max_ejection < out.outlier.ejection {
            let outlier = outbound.key("outlier");
            return Err(Problem::new(
                outlier.key("max_ejection"),
                format!(
                    "max_ejection ({}) is shorter than ejection ({})",
                    out.outlier.max_ejection, out.outlier.ejection
                ),
            )
            .or_at(outlier.key("ejection")));
        }
        let ttl = out.retry_budget.ttl.get();
        if !(std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(60)).contains(&ttl)
        {
            return Err(Problem::new(
                outbound.key("retry_budget").key("ttl"),
                format!(
                    "the retry budget window must be between 1s and 60s, found {}",
                    out.retry_budget.ttl
                ),
            ));
        }
        if out.retry_budget.min_per_second > 1_000_000 {
            return Err(Problem::new(
                outbound.key("retry_budget").key("min_per_second"),
                format!(
                    "at most 1000000 retries per second, found {}",
                    out.retry_budget.min_per_second
                ),
            ));
        }
        self.check_routes()?;
        self.check_hedges()?;
        self.check_faults()?;
        self.check_splits()?;
        self.check_adaptive_concurrency()
    }

    /// Adaptive limits: bounds in order, and not beside the static cap of
    /// the same side (`max_limit` is the adaptive limit's upper bound).
    fn check_adaptive_concurrency(&self) -> Result<(), Problem> {
        let sides = [
            (
                "inbound",
                self.inbound.adaptive_concurrency.as_ref(),
                "max_concurrency",
                self.inbound.max_concurrency.is_some(),
            ),
            (
                "outbound",
                self.outbound.adaptive_concurrency.as_ref(),
                "endpoint_max_concurrency",
                self.outbound.endpoint_max_concurrency.is_some(),
            ),
        ];
        for (side, adaptive, static_key, static_set) in sides {
            let Some(adaptive) = adaptive else { continue };
            let at = KeyPath::new([side, "adaptive_concurrency"]);
            if static_set {
                return Err(Problem::new(
                    at,
                    format!(
                        "set either {side}.{static_key} or {side}.adaptive_concurrency, not both \
                         (max_limit bounds the adaptive limit)"
                    ),
                ));
            }
            check_adaptive_bounds(&at, adaptive)?;
        }
        Ok(())
    }

    fn check_routes(&self) -> Result<(), Problem> {
        let mut names = HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = KeyPath::new(["routes"]).index(i);
            if let Some(first) = names.insert(route.name.as_str(), i) {
                return Err(Problem::new(
                    at.key("name"),
                    format!(
                        "route name {:?} is already used by routes[{first}]",
                        route.name
                    ),
                ));
            }
            if route.r#match.path.is_some() && route.r#match.path_prefix.is_some() {
                return Err(Problem::new(
                    at.key("match").key("path_prefix"),
                    "set either path or path_prefix, not both",
                ));
            }
            check_timeouts(&at, "the route", route.timeout, route.per_try_timeout)?;
            check_queue(&at, route.max_concurrency, route.queue.as_ref())?;
            check_allow(&at, route.allow.as_deref())?;
        }
        Ok(())
    }

    /// A hedge is another try sent while the first may still be processed:
    /// only for requests the route may retry safely (see `hedge.rs`).
    fn check_hedges(&self) -> Result<(), Problem> {
        for (i, route) in self.routes.iter().enumerate() {
            if route.hedge.is_none() {
                continue;
            }
            let non_idempotent = route
                .retry
                .as_ref()
                .or(self.outbound.retry.as_ref())
                .is_some_and(|retry| retry.non_idempotent);
            let methods = &route.r#match.method;
            if non_idempotent || methods.is_empty() || methods.iter().any(is_idempotent) {
                continue;
            }
            let listed: Vec<&str> = methods.iter().map(Method::as_str).collect();
            return Err(Problem::new(
                KeyPath::new(["routes"]).index(i).key("hedge"),
                format!(
                    "this route matches only {} (not idempotent): a hedge would send a request twice; \
                     hedge routes of GET, HEAD, OPTIONS, TRACE, PUT or DELETE, or set retry.non_idempotent",
                    listed.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// A percent needs the fault it is a percent of; a fault needs a delay or
    /// an abort.
    fn check_faults(&self) -> Result<(), Problem> {
        for (i, route) in self.routes.iter().enumerate() {
            let Some(fault) = &route.fault else {
                continue;
            };
            let at = KeyPath::new(["routes"]).index(i).key("fault");
            if fault.delay_percent.is_some() && fault.delay.is_none() {
                return Err(Problem::new(
                    at.key("delay_percent"),
                    "delay_percent needs a delay beside it, e.g. delay = \"200ms\"",
                ));
            }
            if fault.abort_percent.is_some() && fault.abort.is_none() {
                return Err(Problem::new(
                    at.key("abort_percent"),
                    "abort_percent needs an abort status beside it, e.g. abort = 503",
                ));
            }
            if fault.delay.is_none() && fault.abort.is_none() {
                return Err(Problem::new(
                    at,
                    "a fault needs a delay (delay = \"200ms\") or an abort (abort = 503)",
                ));
            }
        }
        Ok(())
    }

    fn check_splits(&self) -> Result<(), Problem> {
        let mut total = 0u32;
        for (i, split) in self.splits.iter().enumerate() {
            total += u32::from(split.weight.get());
            if total > 100 {
                return Err(Problem::new(
                    KeyPath::new(["splits"]).index(i).key("weight"),
                    format!(
                        "the splits add up to {total}% of traffic by here; \
                         together they may take at most 100%"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A caller listed twice is a slip (an edit that meant another name).
fn check_allow(at: &KeyPath, allow: Option<&[CallerId]>) -> Result<(), Problem> {
    let mut seen = HashMap::new();
    for (i, caller) in allow.unwrap_or_default().iter().enumerate() {
        if let Some(first) = seen.insert(caller, i) {
            return Err(Problem::new(
                at.key("allow").index(i),
                format!(
                    "caller {:?} is already listed (allow[{first}])",
                    caller.to_string()
                ),
            ));
        }
    }
    Ok(())
}

/// A queue only makes sense in front of a concurrency cap.
fn check_queue(
    at: &KeyPath,
    max_concurrency: Option<NonZeroU32>,
    queue: Option<&Queue>,
) -> Result<(), Problem> {
    if queue.is_some() && max_concurrency.is_none() {
        return Err(Problem::new(
            at.key("queue"),
            "a queue needs max_concurrency beside it: requests wait only when that many are in flight",
        ));
    }
    Ok(())
}

/// `min_limit <= initial_limit <= max_limit`.
fn check_adaptive_bounds(at: &KeyPath, a: &AdaptiveConcurrency) -> Result<(), Problem> {
    let (min, max) = (a.min_limit.get(), a.max_limit.get());
    if min > max {
        return Err(Problem::new(
            at.key("min_limit"),
            format!("min_limit ({min}) is more than max_limit ({max})"),
        )
        .or_at(at.key("max_limit")));
    }
    if let Some(initial) = a.initial_limit.map(NonZeroU32::get)
        && !(min..=max).contains(&initial)
    {
        return Err(Problem::new(
            at.key("initial_limit"),
            format!("initial_limit ({initial}) is outside min_limit..max_limit ({min}..{max})"),
        ));
    }
    Ok(())
}

/// A try cannot outlast the whole request.
fn check_timeouts(
    at: &KeyPath,
    owner: &str,
    timeout: Option<Duration>,
    per_try: Option<Duration>,
) -> Result<(), Problem> {
    match (timeout, per_try) {
        (Some(timeout), Some(per_try)) if per_try > timeout => Err(Problem::new(
            at.key("per_try_timeout"),
            format!("{per_try} is longer than {owner}'s timeout ({timeout})"),
        )),
        _ => Ok(()),
    }
}

/// The methods RFC 9110 calls idempotent (as the retry rules do).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        method.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use crate::policy::{LoadBalancer, RetryOn};

    fn error(src: &str) -> String {
        let src = format!("service = \"billing\"\n{src}");
        let err = crate::parse_policy(&src, Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        err.lines().next().unwrap_or_default().to_owned()
    }

    #[test]
    fn a_minimal_policy_gets_the_defaults() {
        let policy = crate::parse_policy("service = \"billing\"", Path::new("p.toml")).unwrap();
        assert_eq!(policy.outbound.load_balancer, LoadBalancer::P2cEwma);
        assert_eq!(policy.outbound.connect_timeout.to_string(), "1s");
        assert_eq!(policy.outbound.outlier.consecutive_failures.get(), 5);
        assert_eq!(policy.outbound.retry_budget.ratio.get(), 0.2);
        let settings = policy.outbound.settings_for(None);
        assert_eq!(settings.retry.on[0], RetryOn::ConnectFailure);
        assert!(policy.routes.is_empty() && policy.inbound.max_concurrency.is_none());
    }

    #[test]
    fn queues_need_a_concurrency_cap() {
        assert!(
            error("[inbound]\nqueue = { depth = 1, timeout = \"1s\" }")
                .starts_with("p.toml:3:9: inbound.queue: a queue needs max_concurrency")
        );
        let ok = "[inbound]\nmax_concurrency = 1\nqueue = { depth = 1, timeout = \"1s\" }";
        assert!(crate::parse_policy(&format!("service = \"b\"\n{ok}"), Path::new("p")).is_ok());
    }

    #[test]
    fn allow_lists_name_each_caller_once() {
        assert_eq!(
            error(
                "[[routes]]\nname = \"a\"\nallow = [\"web\", \"spiffe://weft.local/service/web\", \"web\"]"
            ),
            "p.toml:4:52: routes[0].allow[2]: caller \"web\" is already listed (allow[0])"
        );
        // A name and a whole ID are different entries (the ID may be of
        // another trust domain than the sidecar's); an empty list is allowed.
        let ok = "[inbound]\nallow = []\n[[routes]]\nname = \"a\"\nallow = [\"web\", \"spiffe://weft.local/service/web\"]";
        let policy =
            crate::parse_policy(&format!("service = \"b\"\n{ok}"), Path::new("p")).unwrap();
        assert_eq!(policy.inbound.allow.as_deref(), Some(&[][..]));
        assert_eq!(policy.routes[0].allow.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn hedges_only_on_routes_that_may_be_retried_safely() {
        let post = "[[routes]]\nname = \"pay\"\nmatch = { method = \"POST\" }\nhedge = { after = \"20ms\" }";
        let err = error(post);
        assert!(
            err.starts_with(
                "p.toml:5:9: routes[0].hedge: this route matches only POST (not idempotent)"
            ),
            "{err}"
        );
        let parse =
            |text: &str| crate::parse_policy(&format!("service = \"b\"\n{text}"), Path::new("p"));
        // Any method, an idempotent one, or an opt-in to non-idempotent retries.
        for ok in [
            "[[routes]]\nname = \"a\"\nhedge = { after = \"p95\", max = 2 }",
            "[[routes]]\nname = \"a\"\nmatch = { method = [\"POST\", \"GET\"] }\nhedge = { after = \"20ms\" }",
            &format!("{post}\nretry = {{ non_idempotent = true }}"),
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        let policy = parse("[[routes]]\nname = \"a\"\nhedge = { after = \"p95\" }").unwrap();
        assert_eq!(policy.routes[0].hedge.as_ref().unwrap().max, 1);
        assert!(
            error("[[routes]]\nname = \"a\"\nhedge = { after = \"20ms\", max = 4 }")
                .contains("must be from 1 to 3, found 4")
        );
    }

    #[test]
    fn faults_are_checked_key_by_key() {
        let route = |fault: &str| format!("[[routes]]\nname = \"a\"\nfault = {fault}");
        assert_eq!(
            error(&route("{ delay_percent = 5 }")),
            "p.toml:4:27: routes[0].fault.delay_percent: delay_percent needs a delay beside it, e.g. delay = \"200ms\""
        );
        assert!(
            error(&route("{ abort_percent = 5 }")).contains("abort_percent needs an abort status")
        );
        assert!(error(&route("{}")).contains("routes[0].fault: a fault needs a delay"));
        assert!(error(&route("{ abort = 200 }")).contains("a 4xx or 5xx status, found 200"));
        assert!(error(&route("{ abort = 503, abort_percent = 101 }")).contains("from 0 to 100"));
        let policy = crate::parse_policy(
            &format!(
                "service = \"b\"\n{}",
                route("{ delay = \"200ms\", delay_percent = 0.5, abort = 503 }")
            ),
            Path::new("p"),
        )
        .unwrap();
        let fault = policy.routes[0].fault.as_ref().unwrap();
        assert_eq!(fault.delay().unwrap().1, 0.005);
        assert_eq!(fault.abort(), Some((503, 1.0)));
        assert!(!policy.allow_faults);
        assert_eq!(policy.fault_routes(), ["a"]);
    }

    #[test]
    fn per_try_timeouts_fit_in_the_timeout() {
        assert_eq!(
            error("[outbound]\ntimeout = \"1s\"\nper_try_timeout = \"2s\""),
            "p.toml:4:19: outbound.per_try_timeout: 2s is longer than outbound's timeout (1s)"
        );
        assert_eq!(
            error("[[routes]]\nname = \"a\"\ntimeout = \"1s\"\nper_try_timeout = \"1500ms\""),
            "p.toml:5:19: routes[0].per_try_timeout: 1500ms is longer than the route's timeout (1s)"
        );
    }

    #[test]
    fn adaptive_concurrency_bounds_are_ordered_and_exclude_the_static_cap() {
        assert_eq!(
            error("[outbound]\nadaptive_concurrency = { min_limit = 50, max_limit = 10 }"),
            "p.toml:3:38: outbound.adaptive_concurrency.min_limit: min_limit (50) is more than max_limit (10)"
        );
        // The default max_limit is 1000: the error points at the key written.
        assert_eq!(
            error("[inbound.adaptive_concurrency]\nmin_limit = 2000"),
            "p.toml:3:13: inbound.adaptive_concurrency.min_limit: min_limit (2000) is more than max_limit (1000)"
        );
        assert_eq!(
            error("[outbound]\nadaptive_concurrency = { max_limit = 10, initial_limit = 11 }"),
            "p.toml:3:58: outbound.adaptive_concurrency.initial_limit: initial_limit (11) is outside min_limit..max_limit (1..10)"
        );
        assert!(
            error("[outbound]\nendpoint_max_concurrency = 5\nadaptive_concurrency = {}")
                .starts_with("p.toml:4:24: outbound.adaptive_concurrency: set either outbound.endpoint_max_concurrency or")
        );
        assert!(
            error("[inbound]\nmax_concurrency = 5\nadaptive_concurrency = { smoothing = 0 }")
                .contains("must be more than 0.0 and at most 1.0, found 0")
        );
        assert!(
            error("[outbound]\nadaptive_concurrency = { max_limit = 0 }")
                .contains("must be at least 1, found 0")
        );
        assert_eq!(
            error("[outbound]\nadaptive_concurrency = { baseline_window = \"500ms\" }"),
            "p.toml:3:44: outbound.adaptive_concurrency.baseline_window: must be from 1s to 1h, found 500ms"
        );
        let src = "service = \"b\"\n[inbound]\nadaptive_concurrency = { max_limit = 10 }\n\
                   [outbound]\nadaptive_concurrency = { min_limit = 30, tolerance = 2 }";
        let policy = crate::parse_policy(src, Path::new("p")).unwrap();
        let inbound = policy.inbound.adaptive_concurrency.unwrap();
        assert_eq!((inbound.initial(), inbound.min_limit.get()), (10, 1));
        let outbound = policy.outbound.adaptive_concurrency.unwrap();
        assert_eq!((outbound.initial(), outbound.tolerance), (30, 2.0));
        assert_eq!(outbound.smoothing, 0.2);
        assert_eq!(
            outbound.baseline_window,
            crate::duration::Duration::from_secs(60)
        );
        assert_eq!(policy.service_side_keys(), ["inbound.adaptive_concurrency"]);
    }

    #[test]
    fn outlier_ejection_times_are_ordered() {
        assert_eq!(
            error("[outbound.outlier]\nejection = \"10m\""),
            "p.toml:3:12: outbound.outlier.ejection: max_ejection (5m) is shorter than ejection (10m)"
        );
    }

    #[test]
    fn path_and_path_prefix_exclude_each_other() {
        assert_eq!(
            error("[[routes]]\nname = \"a\"\nmatch = { path = \"/a\", path_prefix = \"/b\" }"),
            "p.toml:4:38: routes[0].match.path_prefix: set either path or path_prefix, not both"
        );
    }

    #[test]
    fn matches_are_normalized() {
        let src = "service = \"b\"\n[[routes]]\nname = \"a\"\n\
                   match = { method = [\"get\", \"HEAD\"], headers = [{ name = \"X-Canary\" }] }";
        let policy = crate::parse_policy(src, Path::new("p")).unwrap();
        let m = &policy.routes[0].r#match;
        assert_eq!(
            m.method.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            ["GET", "HEAD"]
        );
        assert_eq!(m.headers[0].name.as_str(), "x-canary");
        assert!(
            error("[[routes]]\nname = \"a\"\nmatch = { method = \"GE T\" }")
                .contains("invalid HTTP method")
        );
        assert!(
            error("[[routes]]\nname = \"a\"\nmatch = { method = [] }")
                .contains("list at least one method")
        );
    }
}
