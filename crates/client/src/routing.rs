//! Partition-leader routing: send a produce straight to the node that leads its partition.
//!
//! Any node accepts any produce and forwards it to the partition's leader, which costs one more
//! hop (latency, and CPU on two nodes). Like Kafka's and Redpanda's clients, the client learns
//! each topic's leaders (DescribeTopic, and node addresses from ClusterStatus) and sends each
//! call to its partition's leader when that leader is one of the client's endpoints. Routing is
//! only a hint: a stale route still works (the server forwards), so it is refreshed lazily, in
//! the background, once it is older than [`ROUTE_TTL`], and at once after a failed call.
//!
//! Keyless records sent without a partition get one here, round robin per call, as the server
//! would have done; keyed records are left to the server's partitioner.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Age after which a route is refreshed in the background.
const ROUTE_TTL: Duration = Duration::from_secs(5);
/// Most topics whose routes are kept; beyond it the table is cleared (routes are only hints).
const TOPICS_MAX: usize = 10_000;

/// Where the partitions of one topic are led.
#[derive(Debug)]
pub(crate) struct TopicRoute {
    /// Index into the client's endpoints of each partition's leader, when known and ours.
    leaders: Vec<Option<usize>>,
    fetched: Instant,
    /// Next partition for keyless records.
    round_robin: AtomicU32,
    /// Set when the route should be refreshed before its age says so.
    stale: AtomicBool,
}

impl TopicRoute {
    pub(crate) fn new(leaders: Vec<Option<usize>>) -> TopicRoute {
        TopicRoute {
            leaders,
            fetched: Instant::now(),
            round_robin: AtomicU32::new(0),
            stale: AtomicBool::new(false),
        }
    }

    pub(crate) fn partitions(&self) -> u32 {
        u32::try_from(self.leaders.len()).unwrap_or(u32::MAX)
    }

    /// The endpoint index of `partition`'s leader, when known.
    pub(crate) fn leader(&self, partition: u32) -> Option<usize> {
        self.leaders
            .get(usize::try_from(partition).ok()?)
            .copied()
            .flatten()
    }

    /// The partition for the next call of keyless records.
    pub(crate) fn next_partition(&self) -> u32 {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % self.partitions().max(1)
    }

    pub(crate) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    fn needs_refresh(&self) -> bool {
        self.stale.load(Ordering::Relaxed) || self.fetched.elapsed() >= ROUTE_TTL
    }
}

/// The routes of every topic this client produced to.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    topics: Mutex<HashMap<String, Arc<TopicRoute>>>,
    /// Topics whose refresh is under way, so concurrent calls start only one.
    refreshing: Mutex<std::collections::HashSet<String>>,
}

impl Routes {
    /// The route of `topic`, and whether it should be refreshed.
    pub(crate) fn get(&self, topic: &str) -> (Option<Arc<TopicRoute>>, bool) {
        let topics = self.topics.lock().expect("route lock is never poisoned");
        match topics.get(topic) {
            Some(route) => (Some(Arc::clone(route)), route.needs_refresh()),
            None => (None, true),
        }
    }

    pub(crate) fn set(&self, topic: &str, route: TopicRoute) {
        let mut topics = self.topics.lock().expect("route lock is never poisoned");
        if topics.len() >= TOPICS_MAX && !topics.contains_key(topic) {
            topics.clear();
        }
        topics.insert(topic.to_owned(), Arc::new(route));
    }

    pub(crate) fn remove(&self, topic: &str) {
        let mut topics = self.topics.lock().expect("route lock is never poisoned");
        topics.remove(topic);
    }

    /// Claims the refresh of `topic`; false when another call is already refreshing it.
    pub(crate) fn start_refresh(&self, topic: &str) -> bool {
        let mut refreshing = self
            .refreshing
            .lock()
            .expect("route lock is never poisoned");
        refreshing.insert(topic.to_owned())
    }

    pub(crate) fn end_refresh(&self, topic: &str) {
        let mut refreshing = self
            .refreshing
            .lock()
            .expect("route lock is never poisoned");
        refreshing.remove(topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_covers_every_partition() {
        let route = TopicRoute::new(vec![Some(0), None, Some(2)]);
        let chosen: Vec<u32> = (0..6).map(|_| route.next_partition()).collect();
        assert_eq!(chosen, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(route.leader(0), Some(0));
        assert_eq!(route.leader(1), None);
        assert_eq!(route.leader(7), None);
    }

    #[tokio::test(start_paused = true)]
    async fn routes_age_and_go_stale() {
        let routes = Routes::default();
        assert!(routes.get("t").1, "an unknown topic needs a route");
        routes.set("t", TopicRoute::new(vec![Some(1)]));
        let (route, refresh) = routes.get("t");
        assert!(!refresh);
        route.expect("a route").mark_stale();
        assert!(routes.get("t").1, "a stale route is refreshed");
        routes.set("t", TopicRoute::new(vec![Some(1)]));
        tokio::time::advance(ROUTE_TTL).await;
        assert!(routes.get("t").1, "an old route is refreshed");
        assert!(routes.start_refresh("t"));
        assert!(!routes.start_refresh("t"), "one refresh at a time");
        routes.end_refresh("t");
        assert!(routes.start_refresh("t"));
    }
}
