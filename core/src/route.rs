//! Route matching: which of a service's `[[routes]]` a request belongs to.
//!
//! A [`RouteTable`] is compiled once from a policy's routes (when the directory is
//! built) and consulted once per outbound request. Routes are tried in file order and
//! the first one whose `match` fits wins; a route with an empty `match` fits every
//! request, and no match at all means the service's defaults (callers treat `None`
//! as the default route).
//!
//! Every key written in a `match` must fit:
//!
//! - `method`: the request method is one of those listed (none listed: any method).
//! - `path`: the URI path (no query) equals it exactly.
//! - `path_prefix`: the URI path starts with it, byte-wise. This is a plain string
//!   prefix, as nginx's `location /prefix` and Envoy's `prefix` do, not a
//!   segment-aware one: `/charge` matches `/charge`, `/charge/42` *and*
//!   `/charges`. Write `/charge/` to match only below it.
//! - `headers`: each listed header is present; with a `value`, one of the header's
//!   values equals it exactly (names compare case-insensitively, values
//!   case-sensitively).
//!
//! Paths are compared as received: no percent-decoding, no dot-segment removal, no
//! trailing-slash folding. An empty path (authority-only absolute URI) counts as `/`.
//!
//! Invariants: methods, header names and header values are converted to their `http`
//! types once, in [`RouteTable::new`], so [`RouteTable::find`] compares without
//! allocating. The config crate validates all three; should a conversion still fail,
//! that route is logged and left out of the table (it never matches) rather than
//! panicking. [`RouteTable::find`] always answers with the index into the policy's
//! `routes`, so skipped routes do not shift the others.

use std::sync::{Arc, LazyLock};

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// A service's routes compiled for matching. First match wins; no match means the
/// service defaults (the caller treats `None` as the default route).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Compiled>,
    /// Every route's name, by index: the `route` label of metrics.
    names: Vec<Arc<str>>,
}

/// The `route` label of a request that matched no route.
static NO_ROUTE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

/// One route's `match`, in the types requests are compared with.
#[derive(Debug, Clone)]
struct Compiled {
    /// Index into the policy's `routes`.
    index: usize,
    /// Empty: any method.
    methods: Vec<Method>,
    path: Option<Box<str>>,
    path_prefix: Option<Box<str>>,
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl RouteTable {
    /// Compile `routes` (a policy's `routes`, in file order).
    pub fn new(routes: &[weft_config::Route]) -> Self {
        let names = routes.iter().map(|r| Arc::from(r.name.as_str())).collect();
        let routes = routes
            .iter()
            .enumerate()
            .filter_map(|(index, route)| Compiled::new(index, route))
            .collect();
        Self { routes, names }
    }

    /// The `route` label of a request that matched no route.
    pub fn no_route() -> &'static Arc<str> {
        &NO_ROUTE
    }

    /// The name of route `index` (empty for no route), as a metric label.
    pub fn label(&self, index: Option<usize>) -> &Arc<str> {
        index.and_then(|i| self.names.get(i)).unwrap_or(&NO_ROUTE)
    }

    /// Index (into the policy's `routes`) of the first route matching the request.
    /// `path` is the URI path without the query (`Uri::path`).
    pub fn find(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<usize> {
        let path = if path.is_empty() { "/" } else { path };
        self.routes
            .iter()
            .find(|route| route.matches(method, path, headers))
            .map(|route| route.index)
    }

    /// How many routes compiled (the others never match).
    #[doc(hidden)]
    pub fn compiled(&self) -> usize {
        self.routes.len()
    }

    /// Whether no route can match, so every request takes the service defaults.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Compiled {
    /// `None` (with a warning) when a value the config crate accepted is still not
    /// a valid `http` value; such a route never matches.
    fn new(index: usize, route: &weft_config::Route) -> Option<Self> {
        let m = &route.r#match;
        // `subject` is a method or header name, never a header value: values can be
        // tokens.
        let never = |problem: &str, subject: &str| {
            tracing::warn!(
                route.name = %route.name,
                route.index = index,
                problem,
                subject,
                "route can never match: a match value is not valid HTTP"
            );
        };

        let mut methods = Vec::with_capacity(m.method.len());
        for method in &m.method {
            match Method::from_bytes(method.as_str().as_bytes()) {
                Ok(method) => methods.push(method),
                Err(_) => {
                    never("invalid method", method.as_str());
                    return None;
                }
            }
        }

        let mut headers = Vec::with_capacity(m.headers.len());
        for header in &m.headers {
            let Ok(name) = HeaderName::from_bytes(header.name.as_str().as_bytes()) else {
                never("invalid header name", header.name.as_str());
                return None;
            };
            let value = match &header.value {
                None => None,
                Some(value) => match HeaderValue::from_str(value) {
                    Ok(value) => Some(value),
                    Err(_) => {
                        never("invalid header value", header.name.as_str());
                        return None;
                    }
                },
            };
            headers.push((name, value));
        }

        Some(Self {
            index,
            methods,
            path: m.path.as_deref().map(Box::from),
            path_prefix: m.path_prefix.as_deref().map(Box::from),
            headers,
        })
    }

    fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.path.as_deref().is_none_or(|p| p == path)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path.starts_with(prefix))
            && self.headers.iter().all(|(name, value)| match value {
                None => headers.contains_key(name),
                Some(value) => headers.get_all(name).iter().any(|v| v == value),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use weft_config::{HeaderMatch, Route, RouteMatch};

    fn route(name: &str, r#match: RouteMatch) -> Route {
        Route {
            name: name.into(),
            r#match,
            timeout: None,
            per_try_timeout: None,
            retry: None,
            rate_limit: None,
            max_concurrency: None,
            queue: None,
            allow: None,
            hedge: None,
            fault: None,
        }
    }

    fn methods(list: &[&str]) -> RouteMatch {
        RouteMatch {
            method: list.iter().map(|m| m.parse().unwrap()).collect(),
            ..RouteMatch::default()
        }
    }

    fn header(name: &str, value: Option<&str>) -> HeaderMatch {
        HeaderMatch {
            name: name.parse().unwrap(),
            value: value.map(Into::into),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn get(table: &RouteTable, path: &str) -> Option<usize> {
        table.find(&Method::GET, path, &HeaderMap::new())
    }

    #[test]
    fn empty_match_fits_everything() {
        let table = RouteTable::new(&[route("all", RouteMatch::default())]);
        assert!(!table.is_empty());
        assert_eq!(get(&table, "/anything"), Some(0));
        assert_eq!(
            table.find(&Method::DELETE, "", &headers(&[("x", "y")])),
            Some(0)
        );
    }

    #[test]
    fn no_routes_means_defaults() {
        let table = RouteTable::new(&[]);
        assert!(table.is_empty());
        assert_eq!(get(&table, "/"), None);
    }

    #[test]
    fn method_is_any_of_the_listed() {
        let table = RouteTable::new(&[route("reads", methods(&["GET", "HEAD"]))]);
        let none = HeaderMap::new();
        assert_eq!(table.find(&Method::GET, "/", &none), Some(0));
        assert_eq!(table.find(&Method::HEAD, "/", &none), Some(0));
        assert_eq!(table.find(&Method::POST, "/", &none), None);
        let custom = RouteTable::new(&[route("purge", methods(&["purge"]))]);
        let purge = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(custom.find(&purge, "/", &none), Some(0));
    }

    #[test]
    fn path_is_exact() {
        let table = RouteTable::new(&[route(
            "charge",
            RouteMatch {
                path: Some("/charge".into()),
                ..RouteMatch::default()
            },
        )]);
        assert_eq!(get(&table, "/charge"), Some(0));
        assert_eq!(get(&table, "/charge/"), None);
        assert_eq!(get(&table, "/charges"), None);
        assert_eq!(get(&table, "/Charge"), None);
        assert_eq!(get(&table, "/"), None);
    }

    #[test]
    fn empty_path_counts_as_root() {
        let table = RouteTable::new(&[route(
            "root",
            RouteMatch {
                path: Some("/".into()),
                ..RouteMatch::default()
            },
        )]);
        assert_eq!(get(&table, ""), Some(0));
        assert_eq!(get(&table, "/"), Some(0));
    }

    #[test]
    fn path_prefix_is_a_plain_string_prefix() {
        let table = RouteTable::new(&[route(
            "charge",
            RouteMatch {
                path_prefix: Some("/charge".into()),
                ..RouteMatch::default()
            },
        )]);
        assert_eq!(get(&table, "/charge"), Some(0));
        assert_eq!(get(&table, "/charge/42"), Some(0));
        assert_eq!(get(&table, "/charges"), Some(0), "not segment-aware");
        assert_eq!(get(&table, "/char"), None);
        assert_eq!(get(&table, "/v1/charge"), None);

        let segment = RouteTable::new(&[route(
            "below",
            RouteMatch {
                path_prefix: Some("/charge/".into()),
                ..RouteMatch::default()
            },
        )]);
        assert_eq!(get(&segment, "/charge/42"), Some(0));
        assert_eq!(get(&segment, "/charges"), None);
    }

    #[test]
    fn header_presence_and_exact_value() {
        let table = RouteTable::new(&[route(
            "canary",
            RouteMatch {
                headers: vec![header("x-canary", Some("1")), header("x-debug", None)],
                ..RouteMatch::default()
            },
        )]);
        let find = |pairs: &[(&str, &str)]| table.find(&Method::GET, "/", &headers(pairs));
        assert_eq!(find(&[("x-canary", "1"), ("x-debug", "")]), Some(0));
        assert_eq!(
            find(&[("X-Canary", "1"), ("X-DEBUG", "yes")]),
            Some(0),
            "names are case-insensitive"
        );
        assert_eq!(find(&[("x-canary", "1")]), None, "x-debug missing");
        assert_eq!(find(&[("x-canary", "2"), ("x-debug", "")]), None);
        assert_eq!(find(&[("x-canary", "10"), ("x-debug", "")]), None);
        assert_eq!(
            find(&[("x-canary", "0"), ("x-canary", "1"), ("x-debug", "")]),
            Some(0),
            "any one of the values may equal it"
        );
    }

    #[test]
    fn header_values_are_case_sensitive() {
        let table = RouteTable::new(&[route(
            "beta",
            RouteMatch {
                headers: vec![header("x-tier", Some("Beta"))],
                ..RouteMatch::default()
            },
        )]);
        let find = |value: &str| table.find(&Method::GET, "/", &headers(&[("x-tier", value)]));
        assert_eq!(find("Beta"), Some(0));
        assert_eq!(find("beta"), None);
    }

    #[test]
    fn every_key_must_fit() {
        let table = RouteTable::new(&[route(
            "charge-writes",
            RouteMatch {
                method: vec!["POST".parse().unwrap()],
                path_prefix: Some("/charge".into()),
                headers: vec![header("x-canary", Some("1"))],
                ..RouteMatch::default()
            },
        )]);
        let canary = headers(&[("x-canary", "1")]);
        assert_eq!(table.find(&Method::POST, "/charge/1", &canary), Some(0));
        assert_eq!(table.find(&Method::GET, "/charge/1", &canary), None);
        assert_eq!(table.find(&Method::POST, "/refund", &canary), None);
        assert_eq!(
            table.find(&Method::POST, "/charge/1", &HeaderMap::new()),
            None
        );
    }

    #[test]
    fn first_match_wins_in_file_order() {
        let table = RouteTable::new(&[
            route(
                "exact",
                RouteMatch {
                    path: Some("/charge/health".into()),
                    ..RouteMatch::default()
                },
            ),
            route(
                "prefix",
                RouteMatch {
                    path_prefix: Some("/charge".into()),
                    ..RouteMatch::default()
                },
            ),
            route("fallback", RouteMatch::default()),
            route(
                "shadowed",
                RouteMatch {
                    path: Some("/other".into()),
                    ..RouteMatch::default()
                },
            ),
        ]);
        assert_eq!(get(&table, "/charge/health"), Some(0));
        assert_eq!(get(&table, "/charge/1"), Some(1));
        assert_eq!(get(&table, "/other"), Some(2), "the catch-all shadows it");
    }

    #[test]
    fn an_invalid_value_leaves_the_route_out_without_shifting_indexes() {
        let table = RouteTable::new(&[
            route(
                "broken",
                RouteMatch {
                    headers: vec![header("x-canary", Some("a\nb"))],
                    ..RouteMatch::default()
                },
            ),
            route("all", RouteMatch::default()),
        ]);
        let req = headers(&[("x-canary", "a")]);
        assert_eq!(table.find(&Method::GET, "/", &req), Some(1));

        let only_broken = RouteTable::new(&[route(
            "broken",
            RouteMatch {
                headers: vec![header("x-canary", Some("\u{7f}"))],
                ..RouteMatch::default()
            },
        )]);
        assert!(only_broken.is_empty());
        assert_eq!(get(&only_broken, "/"), None);
    }

    #[test]
    fn many_routes_match_the_last() {
        // The shape a bench would use: a long table, the request fitting the last route.
        let mut routes: Vec<Route> = (0..64)
            .map(|i| {
                route(
                    &format!("r{i}"),
                    RouteMatch {
                        method: vec!["POST".parse().unwrap()],
                        path_prefix: Some(format!("/api/v1/resource{i}/")),
                        headers: vec![header("x-tenant", Some("acme"))],
                        ..RouteMatch::default()
                    },
                )
            })
            .collect();
        routes.push(route("default", RouteMatch::default()));
        let table = RouteTable::new(&routes);
        let req = headers(&[("x-tenant", "acme"), ("accept", "*/*")]);
        assert_eq!(
            table.find(&Method::POST, "/api/v1/resource63/items", &req),
            Some(63)
        );
        assert_eq!(
            table.find(&Method::GET, "/api/v1/resource63/items", &req),
            Some(64)
        );
    }
}
