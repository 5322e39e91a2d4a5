//! What happened to which process, and when: the record the invariants
//! are judged against.
//!
//! Every process of the chaos mesh is a [`Proc`]. The topology records an
//! [`Change::Up`] once a process serves (an app accepts connections, a
//! sidecar answers `/ready`, a control plane is bound, an etcd member serves
//! reads) or resumes after a pause, and a [`Change::Down`] *just before* it
//! sends the signal that takes it away (or pauses it), so a request in
//! flight at that moment is seen as such. Times are offsets from the start
//! of the run, on the same clock as the traffic records.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One process of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proc {
    /// The app of instance `id`.
    App(String),
    /// The sidecar of instance `id`.
    Sidecar(String),
    /// Control-plane replica `i`.
    ControlPlane(usize),
    /// etcd member `i`.
    Etcd(usize),
}

impl fmt::Display for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proc::App(id) => write!(f, "app {id}"),
            Proc::Sidecar(id) => write!(f, "sidecar {id}"),
            Proc::ControlPlane(i) => write!(f, "control-plane {i}"),
            Proc::Etcd(i) => write!(f, "etcd e{i}"),
        }
    }
}

/// Why a process went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Down {
    /// SIGKILL.
    Kill,
    /// SIGTERM.
    Term,
    /// SIGSTOP (a pause; SIGCONT brings it back).
    Stop,
    /// Taken out of the mesh for good (SIGTERM to the sidecar, then the app).
    Remove,
}

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Down::Kill => "SIGKILL",
            Down::Term => "SIGTERM",
            Down::Stop => "SIGSTOP",
            Down::Remove => "removed",
        })
    }
}

/// A change of a process's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Up,
    Down(Down),
}

/// One recorded change.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Duration,
    pub proc: Proc,
    pub change: Change,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.at.as_secs_f64();
        match self.change {
            Change::Up => write!(f, "{at:8.3}s  {} up", self.proc),
            Change::Down(why) => write!(f, "{at:8.3}s  {} {why}", self.proc),
        }
    }
}

/// The run's clock and its log of changes.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    events: Mutex<Vec<Event>>,
    notes: Mutex<Vec<(Duration, String)>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    /// A timeline starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
        }
    }

    /// Time since the start.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The instant `at` after the start.
    pub fn instant(&self, at: Duration) -> Instant {
        self.start + at
    }

    /// Records that `proc` changed now; returns the time.
    pub fn record(&self, proc: Proc, change: Change) -> Duration {
        let at = self.now();
        self.events.lock().unwrap().push(Event { at, proc, change });
        at
    }

    /// Records a free-text line (a fault chosen, a policy applied, a
    /// restart that failed) for the run's log.
    pub fn note(&self, text: impl Into<String>) {
        let at = self.now();
        self.notes.lock().unwrap().push((at, text.into()));
    }

    /// Every change so far, in time order.
    pub fn events(&self) -> Vec<Event> {
        let mut events = self.events.lock().unwrap().clone();
        events.sort_by_key(|e| e.at);
        events
    }

    /// Every note so far, in time order.
    pub fn notes(&self) -> Vec<(Duration, String)> {
        self.notes.lock().unwrap().clone()
    }
}

/// Each process's changes, for questions about intervals.
#[derive(Debug, Default)]
pub struct Lifelines {
    by_proc: BTreeMap<Proc, Vec<(Duration, Change)>>,
}

impl Lifelines {
    /// Indexes `events` by process.
    pub fn new(events: &[Event]) -> Self {
        let mut by_proc: BTreeMap<Proc, Vec<(Duration, Change)>> = BTreeMap::new();
        for event in events {
            by_proc
                .entry(event.proc.clone())
                .or_default()
                .push((event.at, event.change));
        }
        for changes in by_proc.values_mut() {
            changes.sort_by_key(|(at, _)| *at);
        }
        Self { by_proc }
    }

    /// True if `proc` was up over all of `[from - settle, to]` with no
    /// change at all in that span (so it had served for at least `settle`
    /// when `from` came).
    pub fn steadily_up(&self, proc: &Proc, from: Duration, to: Duration, settle: Duration) -> bool {
        let Some(changes) = self.by_proc.get(proc) else {
            return false;
        };
        let since = from.saturating_sub(settle);
        let mut up = false;
        for (at, change) in changes {
            if *at <= since {
                up = *change == Change::Up;
            } else if *at <= to {
                return false;
            }
        }
        up
    }

    /// The changes of `proc` that took it down within `[from, to]`.
    pub fn downs_within(&self, proc: &Proc, from: Duration, to: Duration) -> Vec<Down> {
        self.by_proc
            .get(proc)
            .into_iter()
            .flatten()
            .filter(|(at, _)| *at >= from && *at <= to)
            .filter_map(|(_, change)| match change {
                Change::Down(why) => Some(*why),
                Change::Up => None,
            })
            .collect()
    }

    /// True if `proc`'s last change was up.
    pub fn up_at_end(&self, proc: &Proc) -> bool {
        self.by_proc
            .get(proc)
            .and_then(|changes| changes.last())
            .is_some_and(|(_, change)| *change == Change::Up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn steadily_up_needs_the_settle_time_and_no_change_in_the_span() {
        let app = Proc::App("a-1".into());
        let events = vec![
            Event {
                at: s(1),
                proc: app.clone(),
                change: Change::Up,
            },
            Event {
                at: s(10),
                proc: app.clone(),
                change: Change::Down(Down::Kill),
            },
            Event {
                at: s(12),
                proc: app.clone(),
                change: Change::Up,
            },
        ];
        let lines = Lifelines::new(&events);
        assert!(lines.steadily_up(&app, s(3), s(9), s(1)));
        assert!(
            !lines.steadily_up(&app, s(9), s(11), s(1)),
            "killed in the span"
        );
        assert!(
            !lines.steadily_up(&app, s(12), s(13), s(1)),
            "not settled yet"
        );
        assert!(lines.steadily_up(&app, s(14), s(20), s(1)));
        assert!(!lines.steadily_up(&Proc::App("other".into()), s(3), s(4), s(1)));
        assert_eq!(lines.downs_within(&app, s(9), s(11)), vec![Down::Kill]);
        assert!(lines.up_at_end(&app));
    }
}
