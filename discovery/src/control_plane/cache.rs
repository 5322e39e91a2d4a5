//! The snapshot cache: the last accepted snapshot on disk, so a sidecar that
//! starts while the control plane is down still knows its services.
//!
//! The file is JSON ([`CacheFile`]): the version and, per service, the wire
//! state as received (instances as [`InstanceRecord`]s, the policy's TOML
//! source, the live-instance count). Loading it runs every service through
//! the same validation as a pushed one, so a hand-edited or stale-format file
//! cannot smuggle in what a push could not.
//!
//! [`keep_written`] is a background task: it writes each new snapshot
//! atomically (a temporary file in the same directory, flushed, then renamed
//! over the old one), at most once per [`MIN_WRITE_INTERVAL`], always the
//! latest one (intermediate snapshots are skipped), and once more on stop if
//! a change is pending. The request path never touches the file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_api::{InstanceRecord, v1};

use super::snapshot::RemoteSnapshot;

/// The cache format this sidecar writes and reads.
pub const FORMAT: u32 = 1;

/// The shortest time between two writes.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// The file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    pub format: u32,
    pub version: i64,
    pub services: Vec<CachedService>,
}

/// One service, as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedService {
    pub name: String,
    pub instances: Vec<InstanceRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_toml: Option<String>,
    pub live_instances: u32,
}

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("reading the snapshot cache {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the snapshot cache {} is not a valid snapshot: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the snapshot cache {} has format {found}; this sidecar reads format {FORMAT}", path.display())]
    Format { path: PathBuf, found: u32 },
    #[error("writing the snapshot cache {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CacheFile {
    pub fn from_snapshot(snapshot: &RemoteSnapshot) -> Self {
        Self {
            format: FORMAT,
            version: snapshot.version,
            services: snapshot
                .services
                .values()
                .map(|s| CachedService {
                    name: s.name.clone(),
                    instances: s.instances.clone(),
                    policy_toml: s.policy_toml.as_deref().map(str::to_owned),
                    live_instances: s.live_instances,
                })
                .collect(),
        }
    }

    /// The services in their wire form, to be validated like a push.
    pub fn wire_services(&self) -> Vec<v1::ServiceState> {
        self.services
            .iter()
            .map(|s| v1::ServiceState {
                name: s.name.clone(),
                instances: s.instances.iter().map(v1::Instance::from).collect(),
                policy_toml: s.policy_toml.clone().unwrap_or_default(),
                live_instances: s.live_instances,
                // The cache holds the policy this sidecar used.
                policy_refused: false,
            })
            .collect()
    }
}

/// Reads the cache; `None` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<CacheFile>, CacheError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    // Check the format first, so a future format is reported as such and
    // not as whatever field it changed.
    #[derive(Deserialize)]
    struct Header {
        format: u32,
    }
    let parse = |source| CacheError::Parse {
        path: path.to_owned(),
        source,
    };
    let header: Header = serde_json::from_slice(&text).map_err(parse)?;
    if header.format != FORMAT {
        return Err(CacheError::Format {
            path: path.to_owned(),
            found: header.format,
        });
    }
    serde_json::from_slice(&text).map(Some).map_err(parse)
}

/// Writes `file` to `path` atomically: a temporary file beside it, flushed to
/// disk, renamed over it. Creates the directory if needed.
pub fn write(path: &Path, file: &CacheFile) -> Result<(), CacheError> {
    let error = |source| CacheError::Write {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(file).map_err(|e| error(io::Error::other(e)))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(error)?;
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "snapshot.json".into());
    name.push(".tmp");
    let tmp = dir.join(name);
    let written = (|| {
        let mut out = fs::File::create(&tmp)?;
        out.write_all(&json)?;
        out.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(error)
}

/// Writes every new snapshot published on `snapshots` to `path`, at most once
/// per [`MIN_WRITE_INTERVAL`], until `stop`; then writes a pending change once.
/// The snapshot current when it starts counts as written (it came from the
/// file, or is empty).
pub async fn keep_written(
    path: PathBuf,
    mut snapshots: watch::Receiver<Arc<RemoteSnapshot>>,
    stop: CancellationToken,
) {
    snapshots.mark_unchanged();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = snapshots.changed() => if changed.is_err() { return },
        }
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        write_off_thread(&path, &snapshot).await;
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(MIN_WRITE_INTERVAL) => {}
        }
    }
    if snapshots.has_changed().unwrap_or(false) {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        write_off_thread(&path, &snapshot).await;
    }
}

async fn write_off_thread(path: &Path, snapshot: &RemoteSnapshot) {
    let file = CacheFile::from_snapshot(snapshot);
    let target = path.to_owned();
    let written = tokio::task::spawn_blocking(move || write(&target, &file)).await;
    match written {
        Ok(Ok(())) => tracing::debug!(
            cache.path = %path.display(),
            snapshot.version = snapshot.version,
            "snapshot cache written"
        ),
        Ok(Err(error)) => tracing::warn!(%error, "snapshot cache not written"),
        Err(error) => {
            tracing::warn!(cache.path = %path.display(), %error, "snapshot cache writer failed")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::control_plane::snapshot::Tracker;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("weft-cache-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn snapshot() -> Arc<RemoteSnapshot> {
        let state = v1::ServiceState {
            name: "billing".to_owned(),
            instances: vec![v1::Instance {
                service: "billing".to_owned(),
                id: "b-1".to_owned(),
                address: "10.0.0.5:4143".to_owned(),
                metadata: Some(v1::Metadata {
                    zone: "eu-1".to_owned(),
                    ..v1::Metadata::default()
                }),
                admin_address: String::new(),
                health: 0,
            }],
            policy_toml: "service = \"billing\"\n".to_owned(),
            live_instances: 1,
            policy_refused: false,
        };
        let mut t = Tracker::default();
        t.restore(42, &[state]);
        Arc::clone(t.snapshot())
    }

    #[test]
    fn round_trip_through_the_validation() {
        let dir = temp_dir("round-trip");
        let path = dir.join("sub/snapshot.json");
        assert!(load(&path).unwrap().is_none());
        let snap = snapshot();
        write(&path, &CacheFile::from_snapshot(&snap)).unwrap();
        assert!(!dir.join("sub/snapshot.json.tmp").exists());
        let file = load(&path).unwrap().unwrap();
        let mut t = Tracker::default();
        let applied = t.restore(file.version, &file.wire_services());
        assert!(applied.rejected.is_empty());
        assert_eq!(**t.snapshot(), *snap);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_files_are_reported() {
        let dir = temp_dir("bad");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snapshot.json");
        fs::write(&path, "{\"format\": 9, \"whatever\": true}").unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, CacheError::Format { found: 9, .. }), "{e}");
        fs::write(&path, "{\"format\": 1, \"version\": 1}").unwrap();
        assert!(matches!(load(&path), Err(CacheError::Parse { .. })));
        fs::write(&path, "not json").unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("is not a valid snapshot"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn writer_writes_the_latest_at_most_once_a_second() {
        let dir = temp_dir("writer");
        let path = dir.join("snapshot.json");
        let (tx, rx) = watch::channel(Arc::new(RemoteSnapshot::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_written(path.clone(), rx, stop.clone()));
        tokio::task::yield_now().await;
        // The starting snapshot is not written.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!path.exists());

        let snap = snapshot();
        tx.send_replace(Arc::clone(&snap));
        let version = |v| {
            let mut s = (*snap).clone();
            s.version = v;
            Arc::new(s)
        };
        // Wait for the first write (spawn_blocking runs on a real thread).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while load(&path).unwrap().map(|f| f.version) != Some(42) {
            assert!(std::time::Instant::now() < deadline, "not written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Two more within the second: only the last is written, after it.
        tx.send_replace(version(43));
        tx.send_replace(version(44));
        tokio::task::yield_now().await;
        assert_eq!(load(&path).unwrap().unwrap().version, 42);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while load(&path).unwrap().map(|f| f.version) != Some(44) {
            assert!(std::time::Instant::now() < deadline, "not written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // A change pending at stop is written once more.
        tx.send_replace(version(45));
        stop.cancel();
        task.await.unwrap();
        assert_eq!(load(&path).unwrap().unwrap().version, 45);
        let _ = fs::remove_dir_all(&dir);
    }
}
