//! The web view on the admin listener (`/ui`): read-only pages of the mesh,
//! rendered on the server ([`pages`], with maud, which escapes every value),
//! refreshed every few seconds by a few kilobytes of plain JavaScript
//! (`ui.js`, which also sorts tables); every page works without it.
//!
//! | request | answer |
//! |---|---|
//! | `GET /ui` | the services |
//! | `GET /ui/graph` | who calls whom |
//! | `GET /ui/services/<name>` | one service: instances, policy, routes, callers, refusals |
//! | `GET /ui/control-plane` | this replica and its store |
//! | `POST /ui/login` | a form with `token`: sets the `weft_ui_token` cookie |
//! | `GET /ui/ui.js` | the script (no token: nothing secret in it) |
//!
//! A page is served to a request presenting an admin token or a read-only
//! UI token (`--ui-token-file`) in an `Authorization: Bearer` header or in
//! the `weft_ui_token` cookie (HttpOnly, SameSite=Strict) that the login
//! form sets; with `--ui-allow-query-token` (for tests and kiosks) also as
//! `?token=`. Without one: 401 and the login form. A control plane with no
//! token at all (`--dev` without `--token-file` or `--ui-token-file`)
//! serves it to anyone, like its admin API. No page ever holds a token.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::admin::AdminState;
use crate::auth::Tokens;

pub mod data;
mod graph;
mod pages;

pub use data::Sampler;

/// The cookie the login form sets.
pub const COOKIE: &str = "weft_ui_token";
/// The script, embedded.
const SCRIPT: &str = include_str!("ui.js");
/// Largest login form body.
const MAX_FORM_BYTES: usize = 4096;

/// How the web view is set up (`--ui-*`).
#[derive(Debug)]
pub struct Ui {
    /// Read-only tokens accepted besides the admin tokens.
    pub tokens: Option<Tokens>,
    /// Accept the token as `?token=` too.
    pub allow_query_token: bool,
    /// Mark the cookie `Secure` (the admin listener is HTTPS).
    pub secure_cookie: bool,
    /// Which store the control plane runs on, for the control-plane page.
    pub store: &'static str,
    pub sampler: Arc<Sampler>,
}

type Rsp = Response<Full<Bytes>>;

/// Whether `path` is the web view's.
pub fn is_ui_path(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// Handle a request for a `/ui` path.
pub async fn handle<S>(ui: &Ui, state: &AdminState<S>, req: Request<Incoming>) -> Rsp {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/ui/ui.js") => {
            return respond(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                SCRIPT.into(),
            );
        }
        (&Method::POST, "/ui/login") => return login(ui, state, req).await,
        _ => {}
    }
    let from_query = match authorize(ui, state, &req) {
        Auth::Denied => {
            return html(StatusCode::UNAUTHORIZED, pages::login(None).into_string());
        }
        Auth::Granted { from_query } => from_query,
    };
    if method != Method::GET && method != Method::HEAD {
        return html(
            StatusCode::METHOD_NOT_ALLOWED,
            pages::not_found("The web view is read-only.").into_string(),
        );
    }
    ui.sampler.viewed();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let view = Arc::clone(&state.view.borrow());
    let (status, page) = match segments.as_slice() {
        ["ui"] => (StatusCode::OK, pages::services(&view, &ui.sampler)),
        ["ui", "graph"] => (StatusCode::OK, pages::graph(&view, &ui.sampler)),
        ["ui", "control-plane"] => (
            StatusCode::OK,
            pages::control_plane(&view, &ui.sampler, &state.metrics, ui.store),
        ),
        ["ui", "services", name] => {
            let name = percent_decode(name);
            match view.services.get(&name) {
                Some(entry) => (StatusCode::OK, pages::service(&view, entry, &ui.sampler)),
                None => (
                    StatusCode::NOT_FOUND,
                    pages::not_found(&format!("No service {name:?} is registered.")),
                ),
            }
        }
        _ => (StatusCode::NOT_FOUND, pages::not_found("No such page.")),
    };
    let mut rsp = html(status, page.into_string());
    if let Some(token) = from_query {
        set_cookie(&mut rsp, ui, &token);
    }
    rsp
}

enum Auth {
    Denied,
    /// `from_query`: the token came in `?token=` (it is set as the cookie
    /// too, so the script's refreshes and the links carry it).
    Granted {
        from_query: Option<String>,
    },
}

/// Whether the request presents a token the web view accepts.
fn authorize<S, B>(ui: &Ui, state: &AdminState<S>, req: &Request<B>) -> Auth {
    if ui.tokens.is_none() && state.tokens.is_none() {
        return Auth::Granted { from_query: None };
    }
    let accepts = |t: &str| {
        ui.tokens.as_ref().is_some_and(|u| u.accepts(t))
            | state.tokens.as_ref().is_some_and(|a| a.accepts(t))
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(accepts) || cookie(req).is_some_and(|t| accepts(&t)) {
        return Auth::Granted { from_query: None };
    }
    if ui.allow_query_token
        && let Some(token) = query_param(req.uri().query().unwrap_or(""), "token")
        && accepts(&token)
    {
        return Auth::Granted {
            from_query: Some(token),
        };
    }
    Auth::Denied
}

/// `POST /ui/login` with `token=...` (a form): on success the cookie and a
/// redirect to `/ui`; else 401 and the form again.
async fn login<S>(ui: &Ui, state: &AdminState<S>, req: Request<Incoming>) -> Rsp {
    let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return html(
                StatusCode::PAYLOAD_TOO_LARGE,
                pages::login(None).into_string(),
            );
        }
    };
    let token = query_param(&String::from_utf8_lossy(&body), "token").unwrap_or_default();
    let valid = ui.tokens.as_ref().is_some_and(|u| u.accepts(&token))
        | state.tokens.as_ref().is_some_and(|a| a.accepts(&token));
    if !valid {
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login(Some("That token is not accepted.")).into_string(),
        );
    }
    let mut rsp = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        Bytes::new(),
    );
    rsp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/ui"));
    set_cookie(&mut rsp, ui, &token);
    rsp
}

fn set_cookie(rsp: &mut Rsp, ui: &Ui, token: &str) {
    let secure = if ui.secure_cookie { "; Secure" } else { "" };
    let value = format!(
        "{COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict{secure}",
        percent_encode(token)
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        rsp.headers_mut().insert(header::SET_COOKIE, v);
    }
}

/// The `weft_ui_token` cookie's value, decoded.
fn cookie<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| percent_decode(value))
}

/// The decoded value of `name` in a query string or form body.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| percent_decode(&v.replace('+', " ")))
}

/// Decodes `%XX` escapes (a malformed one is kept as it is).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes everything but unreserved characters (a path segment, a cookie).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Rsp {
    let mut rsp = Response::new(Full::new(body));
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    rsp
}

fn html(status: StatusCode, page: String) -> Rsp {
    respond(status, "text/html; charset=utf-8", Bytes::from(page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding_round_trips() {
        for s in ["plain", "a b;c=d%", "täst/ü", ""] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(
            query_param("a=1&token=x%2By+z", "token").as_deref(),
            Some("x+y z")
        );
    }
}
