//! Screen: the checks every request passes first, before it costs anything.
//!
//! Both listeners: the request target's length (`[limits] max_uri_length`,
//! 414) and HTTP/1 framing (`Transfer-Encoding` other than one `chunked`,
//! both `Content-Length` and `Transfer-Encoding`, several `Host` headers:
//! 400 `ambiguous-request`, and the connection closes). The inbound
//! listener also refuses an absolute-form request naming another host (403
//! `foreign-authority`): it is never an open proxy. The checks themselves
//! are [`weft_core::screen`]'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::Request;
use tower::{Layer, Service};

use weft_core::error::ProxyError;
use weft_core::screen::{self, LocalNames};

/// What an inbound request may name in absolute form.
#[derive(Debug, Clone)]
pub struct Local {
    pub service: Arc<str>,
    pub listener: Option<SocketAddr>,
    pub advertise: Option<SocketAddr>,
}

// ===== layer =====

#[derive(Debug, Clone)]
pub struct ScreenLayer {
    max_uri_length: usize,
    local: Option<Local>,
}

impl ScreenLayer {
    /// The outbound listener's checks.
    pub fn new(max_uri_length: usize) -> Self {
        Self {
            max_uri_length,
            local: None,
        }
    }

    /// The inbound listener's: also refuse absolute-form requests naming
    /// anything but `local`.
    pub fn inbound(max_uri_length: usize, local: Local) -> Self {
        Self {
            max_uri_length,
            local: Some(local),
        }
    }
}

impl<S> Layer<S> for ScreenLayer {
    type Service = Screen<S>;

    fn layer(&self, inner: S) -> Screen<S> {
        Screen {
            inner,
            layer: self.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct Screen<S> {
    inner: S,
    layer: ScreenLayer,
}

impl<S> Screen<S> {
    fn check<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        screen::request(req, self.layer.max_uri_length)?;
        if let Some(local) = &self.layer.local {
            screen::inbound_authority(
                req,
                LocalNames {
                    service: &local.service,
                    listener: local.listener,
                    advertise: local.advertise,
                },
            )?;
        }
        Ok(())
    }
}

impl<S, B> Service<Request<B>> for Screen<S>
where
    S: Service<Request<B>, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Either<Ready<Result<S::Response, ProxyError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.check(&req) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(refused) => Either::Left(ready(Err(refused))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tower::ServiceExt;

    use super::*;
    use crate::test_util::{arrived, pair};

    #[tokio::test]
    async fn refusals_never_reach_the_inner_service() {
        let (service, mut handle) = pair::<Request<()>, ()>();
        let local = Local {
            service: Arc::from("billing"),
            listener: None,
            advertise: None,
        };
        let mut screen = ScreenLayer::inbound(64, local).layer(service);
        handle.allow(10);
        let long = format!("/{}", "a".repeat(64));
        let cases = [
            (
                Request::get(long.as_str()).body(()).unwrap(),
                Some("uri-too-long"),
            ),
            (
                Request::get("/")
                    .header("transfer-encoding", "gzip")
                    .body(())
                    .unwrap(),
                Some("ambiguous-request"),
            ),
            (
                Request::get("http://elsewhere.example/").body(()).unwrap(),
                Some("foreign-authority"),
            ),
            (Request::get("http://billing/x").body(()).unwrap(), None),
            (Request::get("/ok").body(()).unwrap(), None),
        ];
        for (req, refused) in cases {
            let rsp = screen.ready().await.unwrap().call(req);
            match refused {
                Some(reason) => {
                    assert_eq!(rsp.await.unwrap_err().reason().as_str(), reason);
                    assert!(arrived(&mut handle).await.is_none());
                }
                None => {
                    let (_, send) = arrived(&mut handle).await.unwrap();
                    send.send_response(());
                    rsp.await.unwrap();
                }
            }
        }
    }
}
