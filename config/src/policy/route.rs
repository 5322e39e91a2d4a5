//! Routes and splits: which requests a set of per-route settings applies to,
//! and how traffic is divided between subsets of a service's instances.
//!
//! Routes are tried in file order and the first whose `match` fits wins; a
//! route without `match` fits everything. Matching values are normalized as
//! they parse: methods uppercased, header names lowercased, paths checked to
//! start with `/`, so the proxy compares them without re-checking.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Fault, Hedge, Queue, RateLimit, Retry};
use crate::duration::{self, Duration};
use crate::identity::CallerId;
use crate::number::{self, Percent};
use crate::text::ParseVisitor;

/// One `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct Route {
    /// Unique within the policy; the `route` label of metrics.
    #[serde(deserialize_with = "route_name")]
    pub name: String,
    /// Which requests this route takes. Default: all of them.
    #[serde(default)]
    pub r#match: RouteMatch,
    /// Whole-request timeout, retries included; overrides `outbound.timeout`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "duration::positive_opt"
    )]
    pub timeout: Option<Duration>,
    /// Timeout of each try, at most `timeout`; overrides
    /// `outbound.per_try_timeout`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "duration::positive_opt"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Retries; overrides `outbound.retry` as a whole.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry: Option<Retry>,
    /// A rate limit for this route, per calling sidecar.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_limit: Option<RateLimit>,
    /// In-flight requests allowed on this route, per calling sidecar.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "number::nonzero_opt"
    )]
    pub max_concurrency: Option<NonZeroU32>,
    /// A bounded wait when `max_concurrency` is reached.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub queue: Option<Queue>,
    /// Callers allowed on this route; replaces `inbound.allow` for the
    /// requests the route matches (narrower or wider). Default: `inbound.allow`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub allow: Option<Vec<CallerId>>,
    /// Hedged requests: another try to another endpoint when the first has
    /// no response head after a delay. Default none.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hedge: Option<Hedge>,
    /// Fault injection (delays, aborts) for the route's requests, where
    /// permitted (see `fault.rs`). Default none.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fault: Option<Fault>,
}

fn route_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if name.is_empty() || name.len() > 128 {
        Err(de::Error::custom(
            "a route name must be 1 to 128 characters long",
        ))
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(de::Error::custom(format!(
            "route name {name:?} must not contain spaces"
        )))
    } else {
        Ok(name)
    }
}

/// `match = { ... }`: every key written must fit for the route to match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct RouteMatch {
    /// One method or a list; empty matches any method. Default empty.
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "methods")]
    pub method: Vec<Method>,
    /// The exact path. Default none.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "request_path"
    )]
    pub path: Option<String>,
    /// A path prefix, compared byte-wise. Default none. Not with `path`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "request_path"
    )]
    pub path_prefix: Option<String>,
    /// Headers that must be present (and equal `value` when it is given).
    /// Default empty.
    pub headers: Vec<HeaderMatch>,
}

fn request_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let path = String::deserialize(d)?;
    if !path.starts_with('/') {
        let example = format!("/{}", path.trim_start_matches('/'));
        Err(de::Error::custom(format!(
            "invalid path {path:?}: must start with \"/\", e.g. {example:?}"
        )))
    } else if path
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        Err(de::Error::custom(format!(
            "invalid path {path:?}: must not contain spaces, '?' or '#'"
        )))
    } else {
        Ok(Some(path))
    }
}

/// An HTTP method, uppercased: `GET`, `POST`, or any other token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Method(String);

impl Method {
    /// The method, uppercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_token(s) {
            Ok(Self(s.to_ascii_uppercase()))
        } else {
            Err(format!(
                "invalid HTTP method {s:?}: expected a method such as GET or POST"
            ))
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::new("an HTTP method like \"GET\""))
    }
}

/// `method = "GET"` or `method = ["GET", "HEAD"]`.
fn methods<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Method>, D::Error> {
    struct OneOrMany;

    impl<'de> Visitor<'de> for OneOrMany {
        type Value = Vec<Method>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a method like \"GET\" or a list of methods")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.parse().map(|m| vec![m]).map_err(E::custom)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut methods = Vec::new();
            while let Some(method) = seq.next_element()? {
                methods.push(method);
            }
            if methods.is_empty() {
                return Err(de::Error::custom(
                    "list at least one method, or leave method out to match any",
                ));
            }
            Ok(methods)
        }
    }

    d.deserialize_any(OneOrMany)
}

/// The token characters of RFC 9110, which methods and header names use.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `{ name = "x-canary", value = "1" }`, or just `{ name = "x-debug" }` for
/// presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { name = \"x-canary\", value = \"1\" }"
)]
pub struct HeaderMatch {
    /// The header name, lowercased.
    pub name: HeaderName,
    /// The exact value required; none means the header only has to be present.
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "header_value"
    )]
    pub value: Option<String>,
}

/// A header name, lowercased.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct HeaderName(String);

impl HeaderName {
    /// The name, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HeaderName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_token(s) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(format!(
                "invalid header name {s:?}: use letters, digits and '-', e.g. \"x-canary\""
            ))
        }
    }
}

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ParseVisitor::new("a header name like \"x-canary\""))
    }
}

fn header_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    let visible = |c: char| c == ' ' || c == '\t' || c.is_ascii_graphic();
    if value.chars().all(visible) {
        Ok(Some(value))
    } else {
        Err(de::Error::custom(format!(
            "invalid header value {value:?}: use visible ASCII characters and spaces"
        )))
    }
}

/// One `[[splits]]` entry: `weight` percent of traffic goes to the instances
/// whose metadata has every key/value of `subset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct Split {
    /// Metadata the instances must have, e.g. `{ version = "v2" }`; not empty.
    #[serde(deserialize_with = "subset")]
    pub subset: BTreeMap<String, String>,
    /// Percent of traffic; all splits together at most 100.
    pub weight: Percent,
}

fn subset<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let subset = BTreeMap::<String, String>::deserialize(d)?;
    if subset.is_empty() {
        return Err(de::Error::custom(
            "a subset needs at least one key, e.g. { version = \"v2\" }",
        ));
    }
    Ok(subset)
}
