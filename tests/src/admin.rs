//! A client for the proxy's admin listener.
//!
//! Wraps the plain HTTP/1.1 requests scenarios make to `/live`, `/ready`,
//! `/config`, `/endpoints` and `/reload`, and reads the JSON documents the
//! contract defines (`/config` -> `{"version", "path", "config"}`,
//! `/endpoints` -> `{"version", "services": [{"name", "source",
//! "load_balancer", "endpoints": [{"address", "state", "in_flight",
//! "metadata"}]}]}`) into small accessors, so assertions stay short and a
//! malformed document fails with the document in the message.
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
