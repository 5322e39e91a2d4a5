//! A client for the proxy's admin listener.
//!
//! Wraps the plain HTTP/1.1 requests scenarios make to `/live`, `/ready`,
//! `/config`, `/endpoints` and `/reload`, and reads the JSON documents the
//! contract defines (`/config` -> `{"version", "path", "config"}`,
//! `/endpoints` -> `{"version", "services": [{"name", "source",
//! "load_balancer", "endpoints": [{"address", "state", "in_flight",
//! "metadata"}]}]}`) into small accessors, so assertions stay short and a
//! malformed document fails with the document in the message.
//!
//! With policies enforced, each endpoint's `state` is `active`, `ejected`
//! (with `ejected_for_ms`) or `saturated`, and every service, as well as the
//! top-level `local` object (the inbound side), carries [`Counters`]:
//! `{"requests", "retries", "ejections", "refusals": {<weft-reason>: n}}`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::{Context as _, anyhow, bail};
use http::Request;
use serde_json::Value;

use crate::client::{Client, Reply, empty};

/// A client for one proxy's admin listener.
#[derive(Debug, Clone)]
pub struct Admin {
    addr: SocketAddr,
    client: Client,
}

impl Admin {
    /// A client for the admin listener at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            client: Client::host_header(addr),
        }
    }

    fn uri(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.client.get(&self.uri(path)).await
    }

    /// `POST path` with an empty body.
    pub async fn post(&self, path: &str) -> anyhow::Result<Reply> {
        let request = Request::post(self.uri(path)).body(empty())?;
        self.client.request(request).await
    }

    /// The status `GET /ready` answers.
    pub async fn ready_status(&self) -> anyhow::Result<u16> {
        Ok(self.get("/ready").await?.status.as_u16())
    }

    /// `GET path`, which must answer 200 with JSON.
    pub async fn json(&self, path: &str) -> anyhow::Result<Value> {
        let reply = self.get(path).await?;
        reply.expect_status(200)?;
        serde_json::from_slice(&reply.body)
            .with_context(|| format!("GET {path} is not JSON: {:?}", reply.text()))
    }

    /// `POST /reload`.
    pub async fn reload(&self) -> anyhow::Result<Reply> {
        self.post("/reload").await
    }

    /// The `version` of `GET /config`.
    pub async fn config_version(&self) -> anyhow::Result<u64> {
        let config = self.json("/config").await?;
        config["version"]
            .as_u64()
            .ok_or_else(|| anyhow!("/config has no numeric version: {config}"))
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> anyhow::Result<crate::metrics::Scrape> {
        let reply = self.get("/metrics").await?;
        anyhow::ensure!(reply.status == 200, "/metrics: {}", reply.status);
        crate::metrics::Scrape::parse(&reply.text())
    }

    /// `GET /endpoints`.
    pub async fn endpoints(&self) -> anyhow::Result<Endpoints> {
        Ok(Endpoints(self.json("/endpoints").await?))
    }
}

/// The `/endpoints` document.
#[derive(Debug, Clone)]
pub struct Endpoints(pub Value);

impl Endpoints {
    /// Every service entry.
    pub fn services(&self) -> anyhow::Result<&Vec<Value>> {
        self.0["services"]
            .as_array()
            .ok_or_else(|| anyhow!("/endpoints has no services array: {}", self.0))
    }

    /// The entry of service `name`.
    pub fn service(&self, name: &str) -> anyhow::Result<&Value> {
        self.services()?
            .iter()
            .find(|s| s["name"] == name)
            .ok_or_else(|| anyhow!("/endpoints lists no service {name:?}: {}", self.0))
    }

    /// Addresses of service `name`'s endpoints in state `state`.
    pub fn addresses(&self, name: &str, state: &str) -> anyhow::Result<BTreeSet<SocketAddr>> {
        let service = self.service(name)?;
        let endpoints = service["endpoints"]
            .as_array()
            .ok_or_else(|| anyhow!("service {name:?} has no endpoints array: {service}"))?;
        let mut out = BTreeSet::new();
        for endpoint in endpoints.iter().filter(|e| e["state"] == state) {
            let addr = endpoint["address"]
                .as_str()
                .ok_or_else(|| anyhow!("endpoint without address: {endpoint}"))?;
            out.insert(addr.parse().context("endpoint address")?);
        }
        Ok(out)
    }

    /// The entry of endpoint `addr` of service `name`.
    pub fn endpoint(&self, name: &str, addr: SocketAddr) -> anyhow::Result<&Value> {
        let service = self.service(name)?;
        service["endpoints"]
            .as_array()
            .and_then(|endpoints| {
                endpoints
                    .iter()
                    .find(|e| e["address"] == addr.to_string().as_str())
            })
            .ok_or_else(|| anyhow!("service {name:?} lists no endpoint {addr}: {service}"))
    }

    /// The `state` of endpoint `addr` of service `name`.
    pub fn state(&self, name: &str, addr: SocketAddr) -> anyhow::Result<String> {
        let endpoint = self.endpoint(name, addr)?;
        endpoint["state"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("endpoint without a state: {endpoint}"))
    }

    /// Addresses of service `name`'s endpoints in state `ejected`.
    pub fn ejected(&self, name: &str) -> anyhow::Result<BTreeSet<SocketAddr>> {
        self.addresses(name, "ejected")
    }

    /// The counters of service `name`.
    pub fn counters(&self, name: &str) -> anyhow::Result<Counters> {
        let service = self.service(name)?;
        Counters::new(&service["counters"], &format!("service {name:?}"))
    }

    /// The counters of the inbound side (`local`).
    pub fn local_counters(&self) -> anyhow::Result<Counters> {
        Counters::new(&self.0["local"]["counters"], "local")
    }

    /// Addresses of service `name`'s endpoints in state `active`.
    pub fn active(&self, name: &str) -> anyhow::Result<BTreeSet<SocketAddr>> {
        self.addresses(name, "active")
    }

    /// Fails unless service `name`'s active endpoints are exactly `want`.
    pub fn expect_active(
        &self,
        name: &str,
        want: impl IntoIterator<Item = SocketAddr>,
    ) -> anyhow::Result<()> {
        let want: BTreeSet<_> = want.into_iter().collect();
        let active = self.active(name)?;
        if active != want {
            bail!(
                "service {name:?} active endpoints are {active:?}, want {want:?}: {}",
                self.0
            );
        }
        Ok(())
    }
}

/// One `counters` object of `/endpoints`.
#[derive(Debug, Clone)]
pub struct Counters(pub Value);

impl Counters {
    fn new(value: &Value, owner: &str) -> anyhow::Result<Self> {
        if !value.is_object() || !value["refusals"].is_object() {
            bail!("{owner} has no counters object with refusals: {value}");
        }
        Ok(Self(value.clone()))
    }

    fn number(&self, value: &Value, what: &str) -> anyhow::Result<u64> {
        value
            .as_u64()
            .ok_or_else(|| anyhow!("counter {what} is not a number: {}", self.0))
    }

    /// `requests`.
    pub fn requests(&self) -> anyhow::Result<u64> {
        self.number(&self.0["requests"], "requests")
    }

    /// `retries`.
    pub fn retries(&self) -> anyhow::Result<u64> {
        self.number(&self.0["retries"], "retries")
    }

    /// `ejections`.
    pub fn ejections(&self) -> anyhow::Result<u64> {
        self.number(&self.0["ejections"], "ejections")
    }

    /// `refusals.<reason>` (a `weft-reason` value such as `rate-limit`).
    pub fn refusals(&self, reason: &str) -> anyhow::Result<u64> {
        self.number(&self.0["refusals"][reason], &format!("refusals.{reason}"))
    }
}
