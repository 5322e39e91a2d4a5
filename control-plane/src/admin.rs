//! The admin API `weftctl` talks to: apply, get, delete and list policies and
//! instances. HTTP/1.1 + JSON, authenticated with a bearer token.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/services` | every service: name, whether it has a policy, live instances |
//! | `GET /v1/services/<name>` | the service's policy (TOML source) and instances |
//! | `GET /v1/services/<name>/policy` | the policy exactly as stored, read from the store (so a write is seen at once), with `refused` (why validation refused it, else null) and `in_force` (the policy this control plane serves); 404 if there is none |
//! | `PUT /v1/services/<name>/policy` | validate the body (TOML) with `weft-config` and store it; 400 with the same message `weft-proxy check` gives, nothing written, if it is invalid. A policy with a route `fault` (or the `allow_faults` marker) is refused unless the query says `allow_faults=true` (`weftctl apply --allow-faults`); then it is stored with `allow_faults = true` as its first line |
//! | `DELETE /v1/services/<name>/policy` | remove the policy |
//! | `GET /version` | this control plane's version and git commit |
//! | `GET /live`, `GET /ready` | liveness (`{"status": "live"}`); readiness (the directory view follows the store; 503 too while waiting for the store at start, when only these and `/metrics` answer) |
//! | `GET /metrics` | Prometheus metrics (see [`crate::metrics`]); no token, like `/live` and `/ready` |
//! | `GET /ui`, `/ui/...` | the web view ([`crate::ui`]): its own token check; 404 with `--no-ui` |
//!
//! Reads come from the in-memory view (the same one sidecars are served from);
//! writes go to the store and show up in the view through the watch. The file name
//! the user applied is sent in `weft-file-name` so validation errors name it.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::auth::Tokens;
use crate::keys;
use crate::metrics::{self, Metrics};
use crate::store::{ErrorChain, Store};
use crate::view::DirectoryView;

/// Largest policy accepted (the store's own limit is 1.5 MiB).
const MAX_POLICY_BYTES: usize = 512 * 1024;

/// Shared by every admin connection.
#[derive(Debug)]
pub struct AdminState<S> {
    pub store: Arc<S>,
    pub view: watch::Receiver<Arc<DirectoryView>>,
    /// `None` only in `--dev` mode.
    pub tokens: Option<Tokens>,
    pub metrics: Arc<Metrics>,
    /// The web view (`/ui`); `None` with `--no-ui` (404).
    pub ui: Option<crate::ui::Ui>,
}

type Rsp = Response<Full<Bytes>>;

fn json_rsp(status: StatusCode, value: &Value) -> Rsp {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

fn error(status: StatusCode, message: impl Into<String>) -> Rsp {
    json_rsp(status, &json!({ "error": message.into() }))
}

/// `GET /live`: the process answers.
fn live() -> Rsp {
    json_rsp(StatusCode::OK, &json!({ "status": "live" }))
}

/// Handle one admin request.
pub async fn handle<S: Store>(
    state: Arc<AdminState<S>>,
    req: Request<Incoming>,
) -> Result<Rsp, Infallible> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/live") => return Ok(live()),
        (&Method::GET, "/ready") => {
            let live = state.view.borrow().live;
            return Ok(if live {
                json_rsp(StatusCode::OK, &json!({ "ready": true }))
            } else {
                error(StatusCode::SERVICE_UNAVAILABLE, "not following the store")
            });
        }
        (&Method::GET, "/metrics") => return Ok(metrics::respond(&state.metrics, &state.view)),
        _ => {}
    }
    // The web view checks its own tokens (the admin ones, or read-only UI
    // ones, also from its cookie).
    if crate::ui::is_ui_path(&path) {
        return Ok(match &state.ui {
            Some(ui) => crate::ui::handle(ui, &state, req).await,
            None => error(StatusCode::NOT_FOUND, "the web view is off (--no-ui)"),
        });
    }
    if let Some(tokens) = &state.tokens {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|t| tokens.accepts(t)) {
            let mut rsp = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            rsp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Ok(rsp);
        }
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rsp = match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["version"]) => json_rsp(
            StatusCode::OK,
            &json!({ "version": crate::VERSION, "commit": crate::COMMIT }),
        ),
        (Method::GET, ["v1", "services"]) => list(&state),
        (Method::GET, ["v1", "services", name]) => get(&state, name),
        (Method::GET, ["v1", "services", name, "policy"]) => get_policy(&state, name).await,
        (Method::PUT, ["v1", "services", name, "policy"]) => {
            let name = (*name).to_owned();
            let allow_faults = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|pair| pair == "allow_faults=true"));
            put_policy(&state, &name, req, allow_faults).await
        }
        (Method::DELETE, ["v1", "services", name, "policy"]) => delete_policy(&state, name).await,
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such admin resource: {path}"),
        ),
    };
    Ok(rsp)
}

/// Answers while the control plane waits for its store at start (there is no
/// [`AdminState`] yet): `/live` 200, `/ready` 503, `/metrics`; anything else
/// 503.
pub fn starting<B>(metrics: &Arc<Metrics>, req: &Request<B>) -> Rsp {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => live(),
        (&Method::GET, "/ready") => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store has not answered yet",
        ),
        (&Method::GET, "/metrics") => {
            let (_, empty) = watch::channel(Arc::new(DirectoryView::default()));
            metrics::respond(metrics, &empty)
        }
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the control plane is starting: its store has not answered yet",
        ),
    }
}

fn list<S>(state: &AdminState<S>) -> Rsp {
    let view = Arc::clone(&state.view.borrow());
    let services: Vec<Value> = view
        .services
        .values()
        .map(|s| json!({ "name": s.name, "policy": s.policy_toml.is_some(), "instances": s.instances.len() }))
        .collect();
    json_rsp(
        StatusCode::OK,
        &json!({ "revision": view.revision.0, "live": view.live, "services": services }),
    )
}

fn get<S>(state: &AdminState<S>, name: &str) -> Rsp {
    let view = Arc::clone(&state.view.borrow());
    match view.services.get(name) {
        Some(s) => json_rsp(
            StatusCode::OK,
            &json!({
                "revision": view.revision.0,
                "name": s.name,
                "policy": s.policy_toml.as_deref(),
                "instances": s.instances.values().map(|i| &**i).collect::<Vec<_>>(),
            }),
        ),
        None => error(StatusCode::NOT_FOUND, format!("no service {name:?}")),
    }
}

/// Read from the store, not the view: `weftctl apply` and `diff` compare with
/// it right after a write, before the watch has brought the write to the view.
/// A stored policy that fails validation (written to the store by other means)
/// is ignored by the view and never pushed: `refused` says why, and `in_force`
/// is the policy the view holds instead (the last valid one it saw or found
/// recorded in the store, if any).
async fn get_policy<S: Store>(state: &AdminState<S>, name: &str) -> Rsp {
    match state.store.get(&keys::policy_key(name)).await {
        Ok(Some(kv)) => {
            let refused = crate::view::validate_policy(name, &kv.value).err();
            let in_force = state
                .view
                .borrow()
                .services
                .get(name)
                .and_then(|s| s.policy_toml.clone());
            json_rsp(
                StatusCode::OK,
                &json!({
                    "service": name,
                    "policy": String::from_utf8_lossy(&kv.value),
                    "revision": kv.mod_revision.0,
                    "refused": refused,
                    "in_force": in_force.as_deref(),
                }),
            )
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("service {name:?} has no policy"),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("reading the policy failed: {}", ErrorChain(&e)),
        ),
    }
}

async fn put_policy<S: Store>(
    state: &AdminState<S>,
    name: &str,
    req: Request<Incoming>,
    allow_faults: bool,
) -> Rsp {
    let file = req
        .headers()
        .get("weft-file-name")
        .and_then(|v| v.to_str().ok())
        .filter(|f| !f.is_empty())
        .map_or_else(|| format!("<{name}>"), str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_POLICY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a policy file is at most {MAX_POLICY_BYTES} bytes"),
            );
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{file}: the policy is not UTF-8 text"),
        );
    };
    let policy = match weft_config::parse_policy(text, Path::new(&file)) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if policy.service.as_str() != name {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{file}: the policy is for service {:?}, not {name:?}",
                policy.service.as_str()
            ),
        );
    }
    let body = match fault_permission(&file, text, &policy, allow_faults) {
        Ok(Some(marked)) => Bytes::from(marked),
        Ok(None) => body,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let key = keys::policy_key(name);
    match state.store.put(&key, body, None).await {
        Ok(revision) => {
            tracing::info!(service = name, store.revision = %revision, "policy applied");
            json_rsp(
                StatusCode::OK,
                &json!({ "service": name, "revision": revision.0 }),
            )
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("writing the policy failed: {}", ErrorChain(&e)),
        ),
    }
}

/// Fault injection only from `weftctl apply --allow-faults` (`?allow_faults=true`):
/// without it, a policy with a `fault`, or with the `allow_faults` marker, is
/// refused; with it, a policy with a `fault` is stored with the marker (the
/// text to store instead, `Some`), which is what lets sidecars run it.
fn fault_permission(
    file: &str,
    text: &str,
    policy: &weft_config::Policy,
    allow_faults: bool,
) -> Result<Option<String>, String> {
    let faults = policy.fault_routes();
    if allow_faults {
        return Ok((!faults.is_empty() && !policy.allow_faults)
            .then(|| weft_config::permit_faults(text, false)));
    }
    if let Some(route) = faults.first() {
        return Err(format!(
            "{file}: routes.{route}.fault injects faults: the control plane only stores it from \
             `weftctl apply --allow-faults`"
        ));
    }
    if policy.allow_faults {
        return Err(format!(
            "{file}: allow_faults is written by the control plane itself: apply with \
             `weftctl apply --allow-faults`"
        ));
    }
    Ok(None)
}

async fn delete_policy<S: Store>(state: &AdminState<S>, name: &str) -> Rsp {
    let key = keys::policy_key(name);
    match state.store.delete(&key).await {
        Ok(true) => json_rsp(StatusCode::OK, &json!({ "service": name, "deleted": true })),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("service {name:?} has no policy"),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("deleting the policy failed: {}", ErrorChain(&e)),
        ),
    }
}
