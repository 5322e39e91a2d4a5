//! The store conformance suite: every case runs once against the embedded
//! [`MemoryStore`] and once against [`EtcdStore`] on a real etcd started for
//! that test (`support::etcd`), so the two stores cannot drift apart.
//!
//! The cases live in `conformance/` by topic: `kv` (put, get, delete, size
//! limits, prefix lists with their revision), `watch` (watching from a
//! revision, resuming after a compaction with a fresh list) and `lease`
//! (expiry, keep-alive, revoke). Each is a generic `async fn(&S) ->
//! anyhow::Result<()>`; the macro below instantiates it per store, naming
//! the tests `memory::<case>` and `etcd::<case>`.

mod conformance;
mod support;

use weft_control_plane::store::etcd::{EtcdOptions, EtcdStore};

use weft_tests::etcd::EtcdServer;

/// A fresh etcd and a store connected to it; the server stops when dropped.
async fn etcd_store() -> anyhow::Result<(EtcdServer, EtcdStore)> {
    let server = EtcdServer::start().await?;
    let store = EtcdStore::connect(EtcdOptions::new([server.client_url()])).await?;
    Ok((server, store))
}

macro_rules! conformance {
    ($($topic:ident :: $case:ident),* $(,)?) => {
        mod memory {
            use weft_control_plane::store::memory::{MemoryOptions, MemoryStore};
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    let store = MemoryStore::new(MemoryOptions::default());
                    crate::conformance::$topic::$case(&store).await
                }
            )*
        }

        mod etcd {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    let (_server, store) = crate::etcd_store().await?;
                    crate::conformance::$topic::$case(&store).await
                }
            )*
        }
    };
}

conformance!(
    kv::put_get_delete,
    kv::size_limits,
    kv::list_prefix_with_revision,
    watch::watch_from_revision,
    watch::resume_after_compaction,
    lease::lease_expires_without_keep_alive,
    lease::lease_kept_alive_stays,
    lease::revoke_deletes_at_once,
);
