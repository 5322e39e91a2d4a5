//! Forwarded headers: what the next hop is told about the request, and the
//! hop-by-hop headers it must not see.
//!
//! Outbound: the app may not speak for this sidecar, so `weft-caller` and
//! `weft-protocol` are removed and `weft-caller` set to this sidecar's own
//! service (the callee's sidecar keys per-caller limits on it when the hop
//! is plaintext). Inbound: the client is recorded in `x-forwarded-for` and
//! `forwarded` (`proto=https` over mTLS), and over mTLS `weft-caller` is set
//! to the authenticated caller's name, so the app can trust it. Both: the
//! request is cleaned for proxying once, whatever the number of tries
//! ([`forward::clean`]).

use std::net::SocketAddr;
use std::task::{Context, Poll};

use http::{HeaderValue, Request};
use tower::{Layer, Service};

use weft_core::headers::{self, WEFT_CALLER, WEFT_PROTOCOL};
use weft_transport::forward;
use weft_transport::tls::CallerIdentity;

/// The address of the client connection a request came on (the listeners
/// put it in the request's extensions).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Which side's headers.
#[derive(Debug, Clone)]
pub enum Side {
    /// This sidecar's service name as `weft-caller` (none: no `[service]`).
    Outbound {
        caller: Option<HeaderValue>,
    },
    Inbound,
}

// ===== layer =====

#[derive(Debug, Clone)]
pub struct ForwardedLayer {
    side: Side,
}

impl ForwardedLayer {
    pub fn new(side: Side) -> Self {
        Self { side }
    }
}

impl<S> Layer<S> for ForwardedLayer {
    type Service = Forwarded<S>;

    fn layer(&self, inner: S) -> Forwarded<S> {
        Forwarded {
            inner,
            side: self.side.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Forwarded<S> {
    inner: S,
    side: Side,
}

impl<S, B> Service<Request<B>> for Forwarded<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        match &self.side {
            Side::Outbound { caller } => {
                let headers = req.headers_mut();
                headers.remove(&WEFT_CALLER);
                headers.remove(&WEFT_PROTOCOL);
                if let Some(caller) = caller {
                    headers.insert(&WEFT_CALLER, caller.clone());
                }
            }
            Side::Inbound => inbound(&mut req),
        }
        forward::clean(&mut req);
        self.inner.call(req)
    }
}

fn inbound<B>(req: &mut Request<B>) {
    let host = headers::requested_host(req);
    let caller = req
        .extensions()
        .get::<CallerIdentity>()
        .map(|identity| HeaderValue::from_str(identity.service().as_str()));
    let proto = match caller {
        Some(name) => {
            if let Ok(name) = name {
                req.headers_mut().insert(&WEFT_CALLER, name);
            }
            "https"
        }
        None => "http",
    };
    if let Some(ClientAddr(client)) = req.extensions().get::<ClientAddr>().copied() {
        headers::add_forwarded_proto(req.headers_mut(), client, host.as_deref(), proto);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tower::ServiceExt;

    use super::*;
    use crate::test_util::pair;

    #[tokio::test]
    async fn outbound_the_app_cannot_speak_for_the_sidecar() {
        let (service, mut handle) = pair::<Request<()>, ()>();
        let caller = Some(HeaderValue::from_static("checkout"));
        let layer = ForwardedLayer::new(Side::Outbound { caller }).layer(service);
        let req = Request::get("/")
            .header("weft-caller", "admin")
            .header("weft-protocol", "http2")
            .header("connection", "x-secret")
            .header("x-secret", "1")
            .body(())
            .unwrap();
        let call = tokio::spawn(layer.oneshot(req));
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.headers()["weft-caller"], "checkout");
        assert!(!req.headers().contains_key("weft-protocol"));
        assert!(!req.headers().contains_key("x-secret"), "hop-by-hop");
        send.send_response(());
        call.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn inbound_records_the_client() {
        let (service, mut handle) = pair::<Request<()>, ()>();
        let layer = ForwardedLayer::new(Side::Inbound).layer(service);
        let mut req = Request::get("/")
            .header("host", "billing")
            .header("x-forwarded-for", "10.0.0.9")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(ClientAddr("10.0.0.7:5000".parse().unwrap()));
        let call = tokio::spawn(layer.oneshot(req));
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.headers()["x-forwarded-for"], "10.0.0.9, 10.0.0.7");
        assert_eq!(
            req.headers()["forwarded"],
            "for=10.0.0.7;proto=http;host=billing"
        );
        send.send_response(());
        call.await.unwrap().unwrap();
    }
}
