//! The catch-up throttle: bytes a node sends to replicas being added by a move (learners
//! catching up), bounded to [`crate::RaftOptions::move_bytes_per_sec`] over all of them, so a
//! move does not starve the produce path. Appends to ordinary followers are never throttled.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::GroupId;
use crate::NodeId;

/// Seconds of traffic the bucket may save up.
const BURST: Duration = Duration::from_millis(100);

/// A token bucket over the `(group, target)` links of moves in progress.
pub(crate) struct Throttle {
    /// Bytes per second; 0: unlimited.
    rate: u64,
    links: Mutex<HashSet<(GroupId, NodeId)>>,
    /// Bytes that may be sent now (negative: owed), and when it was last refilled. Held across
    /// the wait, so senders queue in turn.
    bucket: tokio::sync::Mutex<(f64, Instant)>,
}

impl Throttle {
    pub(crate) fn new(rate: u64) -> Self {
        Self {
            rate,
            links: Mutex::new(HashSet::new()),
            bucket: tokio::sync::Mutex::new((0.0, Instant::now())),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashSet<(GroupId, NodeId)>> {
        self.links
            .lock()
            .expect("throttle lock is never poisoned: no panics while held")
    }

    /// Throttles what `group` sends to `target` from now on.
    pub(crate) fn add(&self, group: GroupId, target: NodeId) {
        self.links().insert((group, target));
    }

    /// Keeps only the links `keep` says are still catching up.
    pub(crate) fn retain(&self, keep: impl Fn(GroupId, NodeId) -> bool) {
        self.links().retain(|(group, target)| keep(*group, *target));
    }

    /// Whether what `group` sends to `target` is throttled.
    pub(crate) fn applies(&self, group: GroupId, target: NodeId) -> bool {
        self.rate > 0 && self.links().contains(&(group, target))
    }

    /// Waits until `bytes` may be sent.
    pub(crate) async fn take(&self, bytes: usize) {
        if self.rate == 0 || bytes == 0 {
            return;
        }
        let rate = self.rate as f64;
        let mut bucket = self.bucket.lock().await;
        let now = Instant::now();
        let (tokens, last) = *bucket;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate)
            .min(rate * BURST.as_secs_f64())
            - bytes as f64;
        *bucket = (tokens, now);
        if tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-tokens / rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only registered links are throttled, and a rate of 0 throttles none.
    #[test]
    fn links_are_registered() {
        let throttle = Throttle::new(1000);
        assert!(!throttle.applies(GroupId(1), 2));
        throttle.add(GroupId(1), 2);
        assert!(throttle.applies(GroupId(1), 2));
        assert!(!throttle.applies(GroupId(1), 3));
        throttle.retain(|_, target| target != 2);
        assert!(!throttle.applies(GroupId(1), 2));
        let off = Throttle::new(0);
        off.add(GroupId(1), 2);
        assert!(!off.applies(GroupId(1), 2));
    }

    /// Sending ten times the rate's burst takes about the time the rate says (paused clock).
    #[tokio::test(start_paused = true)]
    async fn bytes_wait_for_the_rate() {
        let throttle = Throttle::new(1_000_000);
        let started = Instant::now();
        for _ in 0..10 {
            throttle.take(100_000).await;
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(1100), "{elapsed:?}");
    }
}
