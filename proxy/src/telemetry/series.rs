//! The series a finished request is counted in, found by its labels'
//! addresses rather than their text.
//!
//! Every finished request adds to one counter and one histogram of
//! `weft_requests_total` / `weft_request_duration_seconds`. Looking them up
//! in their families hashes and compares the label text, twice. The labels
//! of a request are `Arc<str>`s shared by every request from the same
//! caller to the same service and route, so their addresses (with the status, the
//! classification and the direction) identify the series: [`RecentSeries`]
//! maps those to the two series' handles (which share their values with the
//! families). It keeps the label `Arc`s alive, so an address is never
//! reused while it is a key, and it is emptied when it holds [`MAX`]
//! entries (reloads make new label `Arc`s), so it stays bounded.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// Entries kept at most; one per series a request went to recently.
pub const MAX: usize = 4096;

/// One series' identity, by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub direction: u8,
    pub caller: usize,
    pub service: usize,
    pub route: usize,
    pub status: u16,
    /// The classification, as its discriminant.
    pub classification: u8,
}

impl Key {
    pub fn new(
        direction: u8,
        caller: &Arc<str>,
        service: &Arc<str>,
        route: &Arc<str>,
        status: u16,
        classification: u8,
    ) -> Self {
        Self {
            direction,
            caller: Arc::as_ptr(caller).cast::<u8>() as usize,
            service: Arc::as_ptr(service).cast::<u8>() as usize,
            route: Arc::as_ptr(route).cast::<u8>() as usize,
            status,
            classification,
        }
    }
}

/// The two handles of a series, and the labels that keep its key valid.
#[derive(Debug, Clone)]
pub struct Series {
    pub requests: Counter,
    pub durations: Histogram,
    _labels: [Arc<str>; 3],
}

impl Series {
    /// `labels`: the caller, the service and the route.
    pub fn new(requests: Counter, durations: Histogram, labels: [&Arc<str>; 3]) -> Self {
        Self {
            requests,
            durations,
            _labels: labels.map(Arc::clone),
        }
    }
}

/// Multiplicative hashing of a few words (the keys are addresses and small
/// numbers: nothing an attacker chooses).
#[derive(Debug, Default)]
pub struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// The handles of the series requests went to recently.
#[derive(Debug, Default)]
pub struct RecentSeries {
    map: RwLock<HashMap<Key, Series, BuildHasherDefault<WordHasher>>>,
}

impl RecentSeries {
    /// Counts a request of `key`'s series that took `seconds`; false if the
    /// series is not known here (nothing counted).
    pub fn record(&self, key: &Key, seconds: f64) -> bool {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let Some(series) = map.get(key) else {
            return false;
        };
        series.requests.inc();
        series.durations.observe(seconds);
        true
    }

    /// Remembers `series` under `key` (emptied first when full).
    pub fn insert(&self, key: Key, series: Series) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX {
            map.clear();
        }
        map.insert(key, series);
    }

    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(service: &Arc<str>, route: &Arc<str>) -> Series {
        Series::new(
            Counter::default(),
            Histogram::new([0.1]),
            [&Arc::from("checkout"), service, route],
        )
    }

    #[test]
    fn a_known_series_is_counted_by_address_and_the_map_stays_bounded() {
        let (billing, route) = (Arc::<str>::from("billing"), Arc::<str>::from(""));
        let caller = Arc::<str>::from("checkout");
        let key = Key::new(1, &caller, &billing, &route, 200, 0);
        let recent = RecentSeries::default();
        assert!(!recent.record(&key, 0.01), "unknown until inserted");
        let s = series(&billing, &route);
        recent.insert(key, s.clone());
        assert!(recent.record(&key, 0.01));
        assert!(recent.record(&key, 0.01));
        assert_eq!(s.requests.get(), 2);
        // The same text at another address is another key.
        let other = Arc::<str>::from("billing");
        assert!(!recent.record(&Key::new(1, &caller, &other, &route, 200, 0), 0.01));
        assert!(!recent.record(&Key::new(1, &caller, &billing, &route, 503, 0), 0.01));
        let other_caller = Arc::<str>::from("orders");
        assert!(!recent.record(&Key::new(1, &other_caller, &billing, &route, 200, 0), 0.01));

        for i in 0..MAX + 10 {
            let service = Arc::<str>::from(format!("s{i}"));
            recent.insert(
                Key::new(0, &caller, &service, &route, 200, 0),
                series(&service, &route),
            );
        }
        assert!(recent.len() <= MAX);
    }
}
