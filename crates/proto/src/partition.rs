//! Which partition a record goes to: pure functions shared by the broker (records sent without
//! a partition) and the Rust client (which must know the partition of an idempotent produce).
//!
//! - An explicit partition wins.
//! - A key goes to `fnv1a64(key) mod partitions`: stable across nodes, versions and restarts,
//!   so records of one key stay in one partition, in order.
//! - Records without a key are spread: each request without keys picks the next partition of a
//!   node-local round robin, and keeps the whole request there (one log entry, one quorum
//!   round-trip, as Kafka's sticky partitioner does).

/// FNV-1a, 64 bit. Chosen for being trivially specified, so clients in any language can compute
/// the same partition.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition of a keyed record.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (fnv1a64(key) % u64::from(partitions)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Known FNV-1a vectors, so other clients can check their implementation.
    #[test]
    fn fnv_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    proptest! {
        /// A key always maps to the same partition, within range.
        #[test]
        fn key_partition_is_stable_and_in_range(key: Vec<u8>, partitions in 1u32..2000) {
            let p = partition_for_key(&key, partitions);
            prop_assert!(p < partitions);
            prop_assert_eq!(p, partition_for_key(&key, partitions));
        }
    }
}
