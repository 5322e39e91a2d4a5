//! A whole mesh run by a control plane, started in one call
//! ([`Mesh::builder`]): etcd or the embedded store, the control-plane
//! replicas, every service's instances (an in-process app behind a sidecar
//! that registers) and caller-only sidecars, optionally with mTLS between
//! sidecars and on the control planes' gRPC listener. It is handed out once
//! every caller reaches every instance, so a scenario starts from a mesh
//! known to work, and it stops everything it started when dropped.
//!
//! The scenarios that run such a mesh (`control_plane_*`, `app_health`,
//! `authz`) take pieces down through its public fields and start more
//! instances with [`Mesh::add_instance`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, ensure};

use super::{endpoint_addrs, mesh_sidecar};
use crate::backend::Backend;
use crate::client::Client;
use crate::config::Bootstrap;
use crate::control_plane::ControlPlane;
use crate::etcd::EtcdCluster;
use crate::eventually;
use crate::process::{Proxy, TempDir};
use crate::tls::Pki;

/// How long [`MeshBuilder::build`] waits for every caller to reach every
/// instance (registration and push included).
const MESH_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One instance of a service in a [`Mesh`]: an in-process app (its
/// responses say `x-backend: <id>`) behind its own registered sidecar.
#[derive(Debug)]
pub struct Instance {
    /// `<service>-<n>`, counted from 1 per service.
    pub id: String,
    pub service: String,
    // Declared first: the sidecar stops before its app.
    pub sidecar: Proxy,
    pub app: Backend,
}

/// A mesh run by a control plane: etcd (or the embedded store), the
/// control-plane replicas, the instances of each service and caller-only
/// sidecars that learn every destination from the control plane. Every
/// sidecar lists every replica. With mTLS, every sidecar has a certificate
/// from the mesh's CA ([`Mesh::pki`]): an instance its service's, a caller
/// its own name's. Dropping it stops everything: callers and instances
/// first, etcd last (fields drop in declaration order).
///
/// The fields are public so a scenario can take a piece down while it
/// holds others (`mesh.control_planes[0].kill()`).
#[derive(Debug)]
pub struct Mesh {
    pub callers: Vec<Proxy>,
    pub instances: Vec<Instance>,
    pub control_planes: Vec<ControlPlane>,
    /// `None` on the embedded store (`--dev`).
    pub etcd: Option<EtcdCluster>,
    pki: Pki,
    tls: Tls,
    /// How many instances of each service were started (ids stay unique
    /// when a scenario removes one).
    started: BTreeMap<String, usize>,
    /// The control planes' TLS files; declared last, so they outlive them.
    _files: Option<TempDir>,
}

/// Where a [`Mesh`] uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    None,
    /// Between sidecars (`[tls]` in every sidecar).
    Sidecars,
    /// Also on the control planes' gRPC listener (`https://` addresses).
    ControlPlane,
}

/// What [`Mesh::builder`] starts. By default: one `--dev` control plane
/// with its default lease TTL, no services, one caller (`web`) and no TLS.
#[derive(Debug)]
pub struct MeshBuilder {
    etcd_members: Option<usize>,
    replicas: usize,
    lease_ttl: Option<String>,
    services: Vec<(String, usize)>,
    callers: Vec<String>,
    tls: Tls,
    /// More arguments for every control plane.
    control_plane_args: Vec<String>,
}

impl MeshBuilder {
    /// One more argument for every control plane (e.g. `--ui-sample-interval=1s`).
    pub fn control_plane_arg(mut self, arg: &str) -> Self {
        self.control_plane_args.push(arg.to_owned());
        self
    }

    /// The control planes run on a one-node etcd instead of `--dev`.
    pub fn etcd(self) -> Self {
        self.etcd_cluster(1)
    }

    /// The control planes run on an etcd cluster of `members`.
    pub fn etcd_cluster(mut self, members: usize) -> Self {
        self.etcd_members = Some(members);
        self
    }

    /// `replicas` control planes (on etcd: they share the store).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Every control plane's `--lease-ttl`.
    pub fn lease_ttl(mut self, ttl: &str) -> Self {
        self.lease_ttl = Some(ttl.to_owned());
        self
    }

    /// `instances` instances of `service`, ids `<service>-1`, `<service>-2`, ...
    pub fn service(mut self, service: &str, instances: usize) -> Self {
        self.services.push((service.to_owned(), instances));
        self
    }

    /// `callers` caller-only sidecars (default 1), all named `web`.
    pub fn callers(mut self, callers: usize) -> Self {
        self.callers = vec!["web".to_owned(); callers];
        self
    }

    /// One caller-only sidecar per name (its identity under mTLS).
    pub fn callers_named(mut self, names: &[&str]) -> Self {
        self.callers = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// mTLS between sidecars: each has `[tls]` and a certificate from the
    /// mesh's CA (the control planes stay plaintext).
    pub fn mtls(mut self) -> Self {
        if self.tls == Tls::None {
            self.tls = Tls::Sidecars;
        }
        self
    }

    /// mTLS on the control planes' gRPC listener too: they present a
    /// control-plane certificate and the sidecars reach them at `https://`
    /// with their own.
    pub fn control_plane_tls(mut self) -> Self {
        self.tls = Tls::ControlPlane;
        self
    }

    /// Starts everything and returns once a request through each caller to
    /// each service succeeds and each caller lists exactly that service's
    /// instances.
    pub async fn build(self) -> anyhow::Result<Mesh> {
        ensure!(
            self.replicas == 1 || self.etcd_members.is_some(),
            "{} replicas on --dev would not share a store",
            self.replicas
        );
        let etcd = match self.etcd_members {
            Some(members) => Some(EtcdCluster::start(members).await?),
            None => None,
        };
        let pki = Pki::new();
        let (files, tls_args) = if self.tls == Tls::ControlPlane {
            let files = TempDir::new()?;
            let args = pki.control_plane_args(&files)?;
            (Some(files), args)
        } else {
            (None, Vec::new())
        };
        let mut control_planes = Vec::with_capacity(self.replicas);
        for _ in 0..self.replicas {
            let mut builder = match &etcd {
                Some(cluster) => ControlPlane::etcd(cluster.etcd_arg()),
                None => ControlPlane::dev(),
            };
            if let Some(ttl) = &self.lease_ttl {
                builder = builder.lease_ttl(ttl);
            }
            for arg in tls_args.iter().chain(&self.control_plane_args) {
                builder = builder.arg(arg);
            }
            control_planes.push(builder.start().await?);
        }
        let mut mesh = Mesh {
            callers: Vec::with_capacity(self.callers.len()),
            instances: Vec::new(),
            control_planes,
            etcd,
            pki,
            tls: self.tls,
            started: BTreeMap::new(),
            _files: files,
        };
        for (service, instances) in &self.services {
            for _ in 0..*instances {
                mesh.add_instance(service).await?;
            }
        }
        for name in &self.callers {
            let caller = mesh_sidecar(Bootstrap::new(), &mesh.addresses(), mesh.tls_for(name))
                .start()
                .await?;
            mesh.callers.push(caller);
        }
        for caller in &mesh.callers {
            let client = Client::host_header(caller.outbound());
            let admin = caller.admin_client();
            for (service, _) in &self.services {
                let want: BTreeSet<_> = mesh.inbounds(service).into_iter().collect();
                eventually(MESH_READY_TIMEOUT, || async {
                    client
                        .get(&format!("http://{service}/hello"))
                        .await?
                        .expect_status(200)?;
                    let have = endpoint_addrs(&admin, service).await?;
                    ensure!(have == want, "{service}: {have:?}, want {want:?}");
                    Ok(())
                })
                .await
                .with_context(|| format!("a caller reaching every instance of {service}"))?;
            }
        }
        Ok(mesh)
    }
}

impl Mesh {
    pub fn builder() -> MeshBuilder {
        MeshBuilder {
            etcd_members: None,
            replicas: 1,
            lease_ttl: None,
            services: Vec::new(),
            callers: vec!["web".to_owned()],
            tls: Tls::None,
            control_plane_args: Vec::new(),
        }
    }

    /// Every replica's gRPC URL, as the sidecars' `[control_plane]` lists
    /// them (`https://` with [`MeshBuilder::control_plane_tls`]).
    pub fn addresses(&self) -> Vec<String> {
        self.control_planes
            .iter()
            .map(|cp| match self.tls {
                Tls::ControlPlane => format!("https://{}", cp.grpc()),
                Tls::None | Tls::Sidecars => cp.grpc_url(),
            })
            .collect()
    }

    /// The mesh's CA (the sidecars' certificates come from it under mTLS).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// What [`mesh_sidecar`] needs for a sidecar with identity `name`.
    fn tls_for<'a>(&'a self, name: &'a str) -> Option<(&'a Pki, &'a str)> {
        (self.tls != Tls::None).then_some((&self.pki, name))
    }

    /// The first control-plane replica.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_planes[0]
    }

    /// The etcd the control planes run on; an error on `--dev`.
    pub fn etcd(&self) -> anyhow::Result<&EtcdCluster> {
        self.etcd
            .as_ref()
            .context("the mesh runs on --dev, not etcd")
    }

    /// Like [`Mesh::etcd`], to take members down and back.
    pub fn etcd_mut(&mut self) -> anyhow::Result<&mut EtcdCluster> {
        self.etcd
            .as_mut()
            .context("the mesh runs on --dev, not etcd")
    }

    /// The first caller.
    pub fn caller(&self) -> &Proxy {
        &self.callers[0]
    }

    /// A client that sends through the first caller with a Host header
    /// (`http://billing/...`).
    pub fn client(&self) -> Client {
        Client::host_header(self.caller().outbound())
    }

    /// The instance `id`; panics if the mesh has none (a mistake in the test).
    pub fn instance(&self, id: &str) -> &Instance {
        self.instances
            .iter()
            .find(|i| i.id == id)
            .unwrap_or_else(|| panic!("the mesh has no instance {id}"))
    }

    /// The inbound listeners (the addresses they register) of `service`'s
    /// instances, in the order they started.
    pub fn inbounds(&self, service: &str) -> Vec<SocketAddr> {
        self.instances
            .iter()
            .filter(|i| i.service == service)
            .map(|i| i.sidecar.inbound())
            .collect()
    }

    /// Starts one more instance of `service` (its app, then its sidecar,
    /// which is ready when this returns); returns its id.
    pub async fn add_instance(&mut self, service: &str) -> anyhow::Result<String> {
        let n = self.started.entry(service.to_owned()).or_insert(0);
        *n += 1;
        let id = format!("{service}-{n}");
        let app = Backend::start(&id).await?;
        let sidecar = mesh_sidecar(
            Bootstrap::new().app(service, app.addr()).app_id(&id),
            &self.addresses(),
            self.tls_for(service),
        )
        .start()
        .await?;
        self.instances.push(Instance {
            id: id.clone(),
            service: service.to_owned(),
            sidecar,
            app,
        });
        Ok(id)
    }
}
