//! Concurrency caps: at most `max` requests in flight through a limit, with an
//! optional bounded queue.
//!
//! A [`ConcurrencyLimit`] is one semaphore shared, through an `Arc`, by every
//! request that goes through it: a global cap, unlike tower's
//! `ConcurrencyLimitLayer`, which makes one semaphore per service clone. A
//! request takes a [`ConcurrencyPermit`] and holds it until its response body
//! ends (the caller wraps the permit into the body with `body::Tracked`);
//! dropping the permit frees the slot.
//!
//! Invariants: never more than `max` permits are out. A request that finds
//! the cap reached is refused at once unless a queue is configured; with one,
//! at most `depth` requests wait, each for at most `timeout`, in arrival order
//! (tokio's semaphore is fair), and the `depth + 1`th is refused at once. The
//! count of waiters is exact under cancellation: a waiter whose future is
//! dropped (the client went away) gives its place in the queue back. Refusals
//! are [`ConcurrencyCapped`], naming the limit and saying whether the request
//! waited. Users: `policy` builds these (`inbound.max_concurrency`,
//! `routes.<name>.max_concurrency`); the inbound stack acquires before the
//! request goes to the app.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// A refusal: the cap was reached and no queue place (or no slot before the
/// queue's timeout) was available.
#[derive(Debug, Clone, thiserror::Error)]
#[error("concurrency cap {limit} reached")]
pub struct ConcurrencyCapped {
    /// The limit's policy key path, e.g. `inbound.max_concurrency`.
    pub limit: Arc<str>,
    /// True if the request waited in the queue and the wait timed out.
    pub waited: bool,
}

/// A bounded wait for a slot.
#[derive(Debug, Clone, Copy)]
struct Queue {
    depth: u32,
    timeout: Duration,
}

/// One cap shared by every request that goes through it.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    name: Arc<str>,
    max: u32,
    semaphore: Arc<Semaphore>,
    queue: Option<Queue>,
    waiting: AtomicU32,
}

impl ConcurrencyLimit {
    pub fn new(
        name: impl Into<Arc<str>>,
        max: NonZeroU32,
        queue: Option<&weft_config::Queue>,
    ) -> Arc<Self> {
        // tokio's semaphore holds at most `usize::MAX >> 3` permits, more than
        // any u32 on 64-bit targets; clamp rather than panic elsewhere.
        let permits = usize::try_from(max.get())
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            name: name.into(),
            max: u32::try_from(permits).unwrap_or(u32::MAX),
            semaphore: Arc::new(Semaphore::new(permits)),
            queue: queue.map(|q| Queue {
                depth: q.depth.get(),
                timeout: q.timeout.get(),
            }),
            waiting: AtomicU32::new(0),
        })
    }

    /// `previous` when it enforces exactly these settings (so its in-flight
    /// count and queue carry over a policy change), else a new limit.
    pub fn reuse_or_new(
        previous: Option<&Arc<Self>>,
        name: &str,
        max: NonZeroU32,
        queue: Option<&weft_config::Queue>,
    ) -> Arc<Self> {
        match previous {
            Some(p)
                if &*p.name == name
                    && p.max
                        == max
                            .get()
                            .min(u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX))
                    && p.queue.map(|q| (q.depth, q.timeout))
                        == queue.map(|q| (q.depth.get(), q.timeout.get())) =>
            {
                Arc::clone(p)
            }
            _ => Self::new(name, max, queue),
        }
    }

    /// A permit if one is free now (never waits).
    pub fn try_acquire(&self) -> Option<ConcurrencyPermit> {
        Arc::clone(&self.semaphore)
            .try_acquire_owned()
            .ok()
            .map(|permit| ConcurrencyPermit { _permit: permit })
    }

    /// Whether a request that finds the cap reached may wait in a queue.
    pub fn has_queue(&self) -> bool {
        self.queue.is_some()
    }

    /// The refusal of a request that found the cap reached and may not wait.
    pub fn refusal(&self) -> ConcurrencyCapped {
        self.capped(false)
    }

    /// Admit now if under the cap; else, with a queue configured and fewer
    /// than `depth` waiting, wait up to `timeout` for a slot; else refuse at
    /// once.
    pub async fn acquire(self: &Arc<Self>) -> Result<ConcurrencyPermit, ConcurrencyCapped> {
        match Arc::clone(&self.semaphore).try_acquire_owned() {
            Ok(permit) => return Ok(ConcurrencyPermit { _permit: permit }),
            // The semaphore is never closed; a closed one admits nobody.
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {}
        }
        let Some(queue) = self.queue else {
            return Err(self.capped(false));
        };
        let Some(_place) = QueuePlace::take(&self.waiting, queue.depth) else {
            return Err(self.capped(false));
        };
        let acquire = Arc::clone(&self.semaphore).acquire_owned();
        match tokio::time::timeout(queue.timeout, acquire).await {
            Ok(Ok(permit)) => Ok(ConcurrencyPermit { _permit: permit }),
            Ok(Err(_closed)) => Err(self.capped(false)),
            Err(_elapsed) => Err(self.capped(true)),
        }
    }

    /// Permits currently held.
    pub fn in_flight(&self) -> u32 {
        let available = u32::try_from(self.semaphore.available_permits()).unwrap_or(u32::MAX);
        self.max.saturating_sub(available)
    }

    /// Requests waiting in the queue.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn capped(&self, waited: bool) -> ConcurrencyCapped {
        ConcurrencyCapped {
            limit: Arc::clone(&self.name),
            waited,
        }
    }
}

/// Held until the response body ends (the caller wraps it into the body);
/// dropping it frees the slot.
#[derive(Debug)]
pub struct ConcurrencyPermit {
    _permit: OwnedSemaphorePermit,
}

/// A place in a limit's queue, given back when dropped: when the wait ends
/// either way, or when the waiting future is dropped.
struct QueuePlace<'a> {
    waiting: &'a AtomicU32,
}

impl<'a> QueuePlace<'a> {
    /// Take a place if fewer than `depth` are taken.
    fn take(waiting: &'a AtomicU32, depth: u32) -> Option<Self> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < depth).then_some(n + 1)
            })
            .ok()?;
        Some(Self { waiting })
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_util::FutureExt;
    use tokio::time::Instant;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn queue(depth: u32, timeout: Duration) -> weft_config::Queue {
        weft_config::Queue {
            depth: nz(depth),
            timeout: weft_config::Duration::from_millis(
                u64::try_from(timeout.as_millis()).unwrap(),
            ),
        }
    }

    const TIMEOUT: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn unchanged_settings_carry_the_cap_and_its_in_flight_count_over() {
        let q = queue(2, TIMEOUT);
        let old = ConcurrencyLimit::new("inbound.max_concurrency", nz(1), Some(&q));
        let _held = old.acquire().await.unwrap();

        let same =
            ConcurrencyLimit::reuse_or_new(Some(&old), "inbound.max_concurrency", nz(1), Some(&q));
        assert!(Arc::ptr_eq(&old, &same));
        assert_eq!(same.in_flight(), 1);

        let changes = [
            ConcurrencyLimit::reuse_or_new(Some(&old), "inbound.max_concurrency", nz(2), Some(&q)),
            ConcurrencyLimit::reuse_or_new(Some(&old), "inbound.max_concurrency", nz(1), None),
            ConcurrencyLimit::reuse_or_new(
                Some(&old),
                "inbound.max_concurrency",
                nz(1),
                Some(&queue(3, TIMEOUT)),
            ),
            ConcurrencyLimit::reuse_or_new(Some(&old), "routes.a.max_concurrency", nz(1), Some(&q)),
            ConcurrencyLimit::reuse_or_new(None, "inbound.max_concurrency", nz(1), Some(&q)),
        ];
        for new in &changes {
            assert!(!Arc::ptr_eq(&old, new), "{new:?}");
            assert_eq!(new.in_flight(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_at_once_without_a_queue() {
        let limit = ConcurrencyLimit::new("test.max_concurrency", nz(2), None);
        let a = limit.acquire().await.unwrap();
        let _b = limit.acquire().await.unwrap();
        assert_eq!(limit.in_flight(), 2);
        let started = Instant::now();
        let refusal = limit.acquire().now_or_never().unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(&*refusal.limit, "test.max_concurrency");
        assert!(!refusal.waited);
        assert_eq!(
            refusal.to_string(),
            "concurrency cap test.max_concurrency reached"
        );
        assert_eq!(limit.waiting(), 0);
        // Dropping a permit frees its slot.
        drop(a);
        assert_eq!(limit.in_flight(), 1);
        assert!(limit.acquire().now_or_never().unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_gets_a_released_slot() {
        let limit = ConcurrencyLimit::new("test", nz(1), Some(&queue(1, TIMEOUT)));
        let held = limit.acquire().await.unwrap();
        let waiter = limit.acquire();
        tokio::pin!(waiter);
        assert!(waiter.as_mut().now_or_never().is_none());
        assert_eq!((limit.in_flight(), limit.waiting()), (1, 1));

        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        drop(held);
        let started = Instant::now();
        let permit = waiter.await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!((limit.in_flight(), limit.waiting()), (1, 0));
        drop(permit);
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_times_out_at_the_deadline() {
        let limit = ConcurrencyLimit::new("test", nz(1), Some(&queue(1, TIMEOUT)));
        let _held = limit.acquire().await.unwrap();
        let started = Instant::now();
        let refusal = limit.acquire().await.unwrap_err();
        assert!(refusal.waited);
        let waited = started.elapsed();
        assert!(
            waited >= TIMEOUT && waited <= TIMEOUT + Duration::from_millis(1),
            "waited {waited:?}"
        );
        assert_eq!((limit.in_flight(), limit.waiting()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let limit = ConcurrencyLimit::new("test", nz(1), Some(&queue(2, TIMEOUT)));
        let _held = limit.acquire().await.unwrap();
        let first = limit.acquire();
        let second = limit.acquire();
        tokio::pin!(first, second);
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        assert_eq!(limit.waiting(), 2);

        let refusal = limit.acquire().now_or_never().unwrap().unwrap_err();
        assert!(!refusal.waited);
        assert_eq!(limit.waiting(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_gives_its_place_back() {
        let limit = ConcurrencyLimit::new("test", nz(1), Some(&queue(1, TIMEOUT)));
        let held = limit.acquire().await.unwrap();
        {
            let gone = limit.acquire();
            tokio::pin!(gone);
            assert!(gone.as_mut().now_or_never().is_none());
            assert_eq!(limit.waiting(), 1);
        }
        assert_eq!(limit.waiting(), 0);

        // The place can be taken again, and the dropped waiter does not take
        // the released slot.
        let next = limit.acquire();
        tokio::pin!(next);
        assert!(next.as_mut().now_or_never().is_none());
        assert_eq!(limit.waiting(), 1);
        drop(held);
        let _permit = next.await.unwrap();
        assert_eq!((limit.in_flight(), limit.waiting()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order() {
        let limit = ConcurrencyLimit::new("test", nz(1), Some(&queue(3, TIMEOUT)));
        let held = limit.acquire().await.unwrap();
        let first = limit.acquire();
        let second = limit.acquire();
        tokio::pin!(first, second);
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        drop(held);
        // The slot went to `first`; a newcomer cannot take it either.
        assert!(second.as_mut().now_or_never().is_none());
        let newcomer = limit.acquire();
        tokio::pin!(newcomer);
        assert!(newcomer.as_mut().now_or_never().is_none());
        let permit = first.now_or_never().unwrap().unwrap();
        drop(permit);
        assert!(second.await.is_ok());
    }

    /// Many tasks at once, each holding its slot for a while: never more
    /// than `max` hold one, and with a deep enough queue all get through.
    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_under_many_acquirers() {
        const MAX: u32 = 3;
        const TASKS: u32 = 50;
        let limit = ConcurrencyLimit::new(
            "test",
            nz(MAX),
            Some(&queue(TASKS, Duration::from_secs(10))),
        );
        let holding = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (limit, holding, peak) =
                    (Arc::clone(&limit), Arc::clone(&holding), Arc::clone(&peak));
                tokio::spawn(async move {
                    let _permit = limit.acquire().await?;
                    let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    assert!(limit.in_flight() <= MAX);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    holding.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, ConcurrencyCapped>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), MAX);
        assert_eq!((limit.in_flight(), limit.waiting()), (0, 0));
    }

    /// The same on several threads, without a queue: whoever finds the cap
    /// reached is refused, and the holders never exceed it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_cap_holds_across_threads() {
        const MAX: u32 = 4;
        let limit = ConcurrencyLimit::new("test", nz(MAX), None);
        let holding = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (limit, holding) = (Arc::clone(&limit), Arc::clone(&holding));
                tokio::spawn(async move {
                    let Ok(_permit) = limit.acquire().await else {
                        return false;
                    };
                    let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                    assert!(now <= MAX, "{now} holders");
                    for _ in 0..3 {
                        tokio::task::yield_now().await;
                    }
                    holding.fetch_sub(1, Ordering::SeqCst);
                    true
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += u32::from(task.await.unwrap());
        }
        assert!(admitted >= MAX);
        assert_eq!(limit.in_flight(), 0);
    }
}
