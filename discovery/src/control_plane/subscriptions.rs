//! The set of services this sidecar subscribes to, and the request stream
//! that tells the control plane about it.
//!
//! The set only grows: a name is added the first time something asks for it
//! (lazily, on the first request to that service) and stays for the life of
//! the process, so a reconnecting stream can re-send all of it at once. It is
//! bounded ([`MAX_SUBSCRIPTIONS`]) and only takes valid service names, so a
//! local app sending requests to random names cannot grow it without end.
//!
//! Each stream's requests come from [`Subscriptions::requests`]: a first
//! request with the whole set, then one request per change with the names
//! added since. The set lives in a `watch` channel, so bursts of additions
//! are coalesced into one request and nothing queues without bound.

use std::collections::BTreeSet;

use futures_util::Stream;
use tokio::sync::watch;
use weft_api::v1;
use weft_config::ServiceName;
use weft_config::name::InvalidServiceName;

/// The most services one sidecar subscribes to.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// Why a name could not be subscribed to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// Not a service name, so not a service the control plane can know.
    #[error(transparent)]
    InvalidName(#[from] InvalidServiceName),
    /// The set is full.
    #[error("already subscribed to {limit} services, the most one sidecar may")]
    TooMany { limit: usize },
}

/// The subscription set.
#[derive(Debug)]
pub struct Subscriptions {
    names: watch::Sender<BTreeSet<String>>,
}

impl Subscriptions {
    /// A set starting with `initial` (e.g. the cached services and the
    /// sidecar's own service).
    pub fn new(initial: BTreeSet<String>) -> Self {
        Self {
            names: watch::channel(initial).0,
        }
    }

    /// Adds `name`; true when it was not there yet.
    pub fn add(&self, name: &str) -> Result<bool, SubscribeError> {
        if self.names.borrow().contains(name) {
            return Ok(false);
        }
        let name: ServiceName = name.parse()?;
        let mut full = false;
        let added = self.names.send_if_modified(|names| {
            if names.contains(name.as_str()) {
                false
            } else if names.len() >= MAX_SUBSCRIPTIONS {
                full = true;
                false
            } else {
                names.insert(name.to_string())
            }
        });
        if full {
            return Err(SubscribeError::TooMany {
                limit: MAX_SUBSCRIPTIONS,
            });
        }
        Ok(added)
    }

    /// Whether `name` is subscribed to.
    pub fn contains(&self, name: &str) -> bool {
        self.names.borrow().contains(name)
    }

    /// The requests of one new stream, and the names its first request
    /// carries. The stream never ends by itself; it is dropped with its
    /// session.
    pub fn requests(
        &self,
    ) -> (
        BTreeSet<String>,
        impl Stream<Item = v1::SubscribeRequest> + Send + 'static,
    ) {
        let mut rx = self.names.subscribe();
        let initial = rx.borrow_and_update().clone();
        let first = v1::SubscribeRequest {
            add: initial.iter().cloned().collect(),
            remove: Vec::new(),
        };
        let state = (rx, initial.clone(), Some(first));
        let stream = futures_util::stream::unfold(state, |(mut rx, mut sent, first)| async move {
            if let Some(first) = first {
                return Some((first, (rx, sent, None)));
            }
            loop {
                if rx.changed().await.is_err() {
                    // The client is gone; its session goes with it.
                    std::future::pending::<()>().await;
                }
                let add: Vec<String> = rx.borrow_and_update().difference(&sent).cloned().collect();
                if add.is_empty() {
                    continue;
                }
                sent.extend(add.iter().cloned());
                let request = v1::SubscribeRequest {
                    add,
                    remove: Vec::new(),
                };
                return Some((request, (rx, sent, None)));
            }
        });
        (initial, stream)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn first_request_carries_the_set_then_only_additions() {
        let subs = Subscriptions::new(["a".to_owned()].into());
        assert!(subs.add("b").unwrap());
        assert!(!subs.add("b").unwrap());
        let (initial, stream) = subs.requests();
        assert_eq!(initial, ["a", "b"].map(String::from).into());
        let mut stream = Box::pin(stream);
        assert_eq!(stream.next().await.unwrap().add, ["a", "b"]);

        // Several additions before the stream is polled: one request.
        subs.add("d").unwrap();
        subs.add("c").unwrap();
        subs.add("a").unwrap();
        assert_eq!(stream.next().await.unwrap().add, ["c", "d"]);

        // A second stream starts from the whole set.
        let (initial, stream) = subs.requests();
        assert_eq!(initial.len(), 4);
        assert_eq!(Box::pin(stream).next().await.unwrap().add.len(), 4);
    }

    #[test]
    fn invalid_names_are_refused() {
        let subs = Subscriptions::new(BTreeSet::new());
        assert!(matches!(
            subs.add("Billing:80"),
            Err(SubscribeError::InvalidName(_))
        ));
        assert!(!subs.contains("Billing:80"));
    }

    #[test]
    fn the_set_is_bounded() {
        let subs = Subscriptions::new((0..MAX_SUBSCRIPTIONS).map(|i| format!("s{i}")).collect());
        assert_eq!(
            subs.add("one-more"),
            Err(SubscribeError::TooMany {
                limit: MAX_SUBSCRIPTIONS
            })
        );
        assert!(!subs.add("s1").unwrap());
    }
}
