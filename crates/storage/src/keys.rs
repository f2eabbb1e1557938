//! Key layout and the checksummed value frame.
//!
//! Every key starts with the 8-byte big-endian group id so one group's data is one contiguous
//! range in each column family (deleting a group is a range delete) and keys sort by group, then
//! by index or offset. Values are framed as `crc32c (4 bytes LE) ++ payload`; the frame is
//! verified on every read.
//!
//! Never: change a key's or a frame's byte layout: both are on disk.

use crate::error::StorageError;

/// Identifies one group on a node: one log, its metadata and its offset index. The caller
/// chooses the ids; storage gives none of them a meaning (Ordo's cluster metadata uses 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Length of a `(group, u64)` key.
pub(crate) const KEY_LEN: usize = 16;

/// `group ++ n`, both big-endian, so keys sort by group then by `n`.
pub(crate) fn key(group: GroupId, n: u64) -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    key[..8].copy_from_slice(&group.0.to_be_bytes());
    key[8..].copy_from_slice(&n.to_be_bytes());
    key
}

/// Splits a key made by [`key`]; `None` for a key of another shape.
pub(crate) fn split_key(key: &[u8]) -> Option<(GroupId, u64)> {
    if key.len() != KEY_LEN {
        return None;
    }
    let group = u64::from_be_bytes(key[..8].try_into().ok()?);
    let n = u64::from_be_bytes(key[8..].try_into().ok()?);
    Some((GroupId(group), n))
}

/// Frames a payload with its checksum.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(4 + payload.len());
    value.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    value.extend_from_slice(payload);
    value
}

/// Verifies a framed value and returns its payload.
pub(crate) fn unframe<'a>(
    value: &'a [u8],
    what: impl FnOnce() -> String,
) -> Result<&'a [u8], StorageError> {
    if value.len() < 4 {
        return Err(StorageError::Malformed {
            what: what(),
            reason: "value shorter than its checksum",
        });
    }
    let (stored, payload) = value.split_at(4);
    let stored = u32::from_le_bytes(stored.try_into().expect("split_at(4) yields 4 bytes"));
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err(StorageError::Corruption {
            what: what(),
            stored,
            computed,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Keys sort by group, then by index, exactly as the integers do.
        #[test]
        fn key_order_matches_integer_order(g1: u64, n1: u64, g2: u64, n2: u64) {
            let a = key(GroupId(g1), n1);
            let b = key(GroupId(g2), n2);
            prop_assert_eq!(a.cmp(&b), (g1, n1).cmp(&(g2, n2)));
            prop_assert_eq!(split_key(&a), Some((GroupId(g1), n1)));
        }

        /// A framed payload reads back; any single flipped bit is detected.
        #[test]
        fn frame_detects_bit_flips(payload: Vec<u8>, bit in 0usize..64) {
            let mut value = frame(&payload);
            prop_assert_eq!(unframe(&value, String::new).unwrap(), &payload[..]);
            let bit = bit % (value.len() * 8);
            value[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(unframe(&value, String::new).is_err());
        }
    }
}
