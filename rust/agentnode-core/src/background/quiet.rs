//! Background work keeps out of the way of starts in flight. A kernel built without full
//! preemption (the default `preempt=none` here) runs a thread's kernel work to its end: a network
//! namespace being made, or a mount namespace torn down, holds its CPU for up to a millisecond,
//! and a start whose next step wakes on that CPU waits that long (measured: half of the starts
//! of a tight loop waited 0.2 to 0.9 ms at one wake-up or another). So the threads that make
//! things ahead ([`crate::background::ahead`]) and clean up after ([`crate::background::later`]) wait, before each item,
//! until no start is in flight, for a bounded time so that a steady stream of starts cannot
//! starve them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// An atomic rather than a lock: a forked child must never find it held by a thread it lacks.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// The longest a background item waits for the starts in flight.
const PATIENCE: Duration = Duration::from_millis(20);

/// Marks a start in flight until dropped.
#[must_use]
pub struct Starting(());

/// Marks a start in flight: background items wait until it is dropped.
pub fn starting() -> Starting {
    IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
    Starting(())
}

impl Drop for Starting {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits until no start is in flight, or [`PATIENCE`] has passed. It polls: a start lasts well
/// under a millisecond, and only background threads wait.
pub fn wait() {
    let deadline = Instant::now() + PATIENCE;
    while IN_FLIGHT.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}
