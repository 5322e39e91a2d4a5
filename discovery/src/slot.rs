//! A value the crates above build for something discovery owns, on first use,
//! and keep exactly as long as discovery keeps it.
//!
//! The sidecar caches each service's layer stack in its [`MeshService`]
//! (`crate::directory::MeshService::stack`): the stack is built the first
//! time the service is called and dropped with the service, when a reload or
//! a push replaces it (a new policy, client or balancer means a new
//! `MeshService`, so a stale stack is never used). This crate cannot name
//! the stack's type (the stack crate sits above it), so the slot holds it as
//! `Any`.
//!
//! [`MeshService`]: crate::directory::MeshService

use std::any::Any;
use std::fmt;
use std::sync::OnceLock;

/// Empty until the first [`Slot::get_or_init`].
#[derive(Default)]
pub struct Slot(OnceLock<Box<dyn Any + Send + Sync>>);

impl Slot {
    /// The value, built by `init` if the slot is empty. `None` when the slot
    /// holds a value of another type (one slot has one user: it does not
    /// happen).
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.0.get_or_init(|| Box::new(init())).downcast_ref()
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("filled", &self.0.get().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn built_once_then_kept() {
        let slot = Slot::default();
        let mut builds = 0;
        assert_eq!(
            slot.get_or_init(|| {
                builds += 1;
                7u32
            }),
            Some(&7)
        );
        assert_eq!(slot.get_or_init(|| 8u32), Some(&7));
        assert_eq!(builds, 1);
        assert!(slot.get_or_init(|| "other type").is_none());
    }
}
