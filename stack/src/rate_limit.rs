//! Rate limit: refuse a request past a limit's rate, at once (never queued).
//!
//! The limits are governor's GCRA (see [`weft_core::limits::rate`]): a
//! service-wide limit at this instance's share (`inbound.rate_limit`), a
//! route's (`routes.<name>.rate_limit`, from the [`InboundRoute`] the route
//! layer matched), one per caller (`inbound.caller_rate_limit`, keyed by the
//! caller's identity: the service named by its mTLS certificate, else the
//! `weft-caller` header, else `anonymous`), and a caller sidecar's own rate
//! towards a service (`outbound.rate_limit`). A refusal is
//! [`ProxyError::RateLimited`] naming the limit and when to retry.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::Request;
use tower::{Layer, Service};

use weft_core::error::ProxyError;
use weft_core::headers::WEFT_CALLER;
use weft_core::limits::{CallerRateLimit, RateLimit as Limit, RateLimited};
use weft_core::policy::InboundRoute;
use weft_transport::tls::CallerIdentity;

/// The caller identity of requests that carry none.
pub const ANONYMOUS: &str = "anonymous";

/// Which limit a layer enforces.
#[derive(Debug, Clone)]
pub enum Which {
    /// None (the policy sets no such limit).
    Off,
    /// One limit for every request through the layer.
    Service(Arc<Limit>),
    /// The matched route's limit, if it has one.
    Route,
    /// One bucket per caller.
    Caller(Arc<CallerRateLimit>),
}

impl Which {
    fn check<B>(&self, req: &Request<B>) -> Result<(), RateLimited> {
        match self {
            Self::Off => Ok(()),
            Self::Service(limit) => limit.check(),
            Self::Route => match req
                .extensions()
                .get::<Arc<InboundRoute>>()
                .and_then(|route| route.rate_limit.as_ref())
            {
                Some(limit) => limit.check(),
                None => Ok(()),
            },
            Self::Caller(limit) => limit.check(caller(req)),
        }
    }
}

/// The caller a per-caller limit counts `req` against.
pub fn caller<B>(req: &Request<B>) -> &str {
    match req.extensions().get::<CallerIdentity>() {
        Some(identity) => identity.service().as_str(),
        None => req
            .headers()
            .get(&WEFT_CALLER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .unwrap_or(ANONYMOUS),
    }
}

// ===== layer =====

#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    which: Which,
}

impl RateLimitLayer {
    pub fn new(which: Which) -> Self {
        Self { which }
    }

    /// One limit for every request, if the policy sets one.
    pub fn service(limit: Option<&Arc<Limit>>) -> Self {
        Self::new(limit.map_or(Which::Off, |l| Which::Service(Arc::clone(l))))
    }

    /// A bucket per caller, if the policy sets such a limit.
    pub fn per_caller(limit: Option<&Arc<CallerRateLimit>>) -> Self {
        Self::new(limit.map_or(Which::Off, |l| Which::Caller(Arc::clone(l))))
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            which: self.which.clone(),
        }
    }
}

// ===== service =====

#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    which: Which,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
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
        match self.which.check(&req) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(refused) => Either::Left(ready(Err(refused.into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;
    use crate::test_util::{Handle, MockService, arrived, pair};
    use weft_core::limits::Share;

    fn config(per_second: u32, burst: u32) -> weft_config::RateLimit {
        let src = format!(
            "service = \"billing\"\n[inbound]\nrate_limit = {{ per_second = {per_second}, burst = {burst} }}"
        );
        weft_config::parse_policy(&src, std::path::Path::new("billing.toml"))
            .unwrap()
            .inbound
            .rate_limit
            .unwrap()
    }

    fn limit(per_second: u32, burst: u32) -> Arc<Limit> {
        Arc::new(Limit::new(
            "inbound.rate_limit",
            &config(per_second, burst),
            Share::ONE,
        ))
    }

    /// Sends one request through; true if it reached the inner service.
    async fn admitted(
        layer: &mut RateLimit<MockService<Request<()>, ()>>,
        handle: &mut Handle<Request<()>, ()>,
    ) -> bool {
        handle.allow(1);
        let rsp = layer
            .ready()
            .await
            .unwrap()
            .call(Request::get("/").body(()).unwrap());
        let Some((_, send)) = arrived(handle).await else {
            let refused = rsp.await.unwrap_err();
            assert!(matches!(refused, ProxyError::RateLimited(_)), "{refused}");
            assert_eq!(refused.limit(), Some("inbound.rate_limit"));
            return false;
        };
        send.send_response(());
        rsp.await.unwrap();
        true
    }

    #[tokio::test]
    async fn refuses_past_the_rate_and_recovers() {
        let (service, mut handle) = pair::<Request<()>, ()>();
        let mut layer = RateLimitLayer::new(Which::Service(limit(10, 2))).layer(service);
        assert!(admitted(&mut layer, &mut handle).await);
        assert!(admitted(&mut layer, &mut handle).await);
        assert!(!admitted(&mut layer, &mut handle).await, "burst spent");
        // governor's clock is real time: 10 per second is a token per 100 ms.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(admitted(&mut layer, &mut handle).await, "a token came back");
    }

    #[tokio::test]
    async fn per_caller_limits_count_each_caller_apart() {
        let config = weft_config::parse_policy(
            "service = \"billing\"\n[inbound]\ncaller_rate_limit = { per_second = 1, burst = 1 }",
            std::path::Path::new("billing.toml"),
        )
        .unwrap()
        .inbound
        .caller_rate_limit
        .unwrap();
        let limit = Arc::new(CallerRateLimit::new(
            "inbound.caller_rate_limit",
            &config,
            Share::ONE,
        ));
        let (service, mut handle) = pair::<Request<()>, ()>();
        let mut layer = RateLimitLayer::new(Which::Caller(limit)).layer(service);
        let from = |caller: &str| {
            Request::get("/")
                .header("weft-caller", caller)
                .body(())
                .unwrap()
        };
        for (caller, expected) in [
            ("web", true),
            ("web", false),
            ("batch", true),
            ("", true),
            ("", false),
        ] {
            handle.allow(1);
            let rsp = layer.ready().await.unwrap().call(from(caller));
            match arrived(&mut handle).await {
                Some((_, send)) => {
                    assert!(expected, "{caller:?} admitted");
                    send.send_response(());
                    rsp.await.unwrap();
                }
                None => {
                    assert!(!expected, "{caller:?} refused");
                    assert_eq!(
                        rsp.await.unwrap_err().limit(),
                        Some("inbound.caller_rate_limit")
                    );
                }
            }
        }
    }
}
