//! The interface through which the broker's metadata state is replicated.

use crate::MetaRestoreError;

/// The metadata state machine's logic, implemented by the broker. Commands and answers are
/// opaque bytes here: this crate replicates them and never reads them.
pub trait MetaApply: Send + Sync + 'static {
    /// Applies one committed command at log `index` and returns the encoded answer.
    /// Must be deterministic: every replica applies the same commands in the same order.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    /// The whole state, encoded.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with an encoded one.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), MetaRestoreError>;
    /// Called once the applied commands' writes are readable on this node (not necessarily
    /// fsynced: see `machine`): publish the new state.
    fn publish(&self);
}

/// The logic of a state group: a small replicated state machine the broker implements (a
/// consumer group coordinator), whose state is mostly rows (one per consumer group, say), each
/// written when it changes instead of the whole state after every command. Commands and answers
/// are opaque bytes here.
pub trait StateApply: Send + Sync + 'static {
    /// Applies one committed command at log `index` and returns the encoded answer.
    /// Must be deterministic: every replica applies the same commands in the same order.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    /// The rows changed since the last call: `(row id, its bytes, or None once deleted)`. Row
    /// ids are at most [`ordo_storage::ROW_ID_MAX`].
    fn take_changes(&mut self) -> Vec<(u64, Option<Vec<u8>>)>;
    /// The state outside the rows, encoded (small: written after every applied batch).
    fn encode_state(&self) -> Vec<u8>;
    /// Every row.
    fn rows(&self) -> Vec<(u64, Vec<u8>)>;
    /// Replaces the state with a persisted one: `state` from [`StateApply::encode_state`] and
    /// every row.
    fn restore(&mut self, state: &[u8], rows: Vec<(u64, Vec<u8>)>) -> Result<(), MetaRestoreError>;
}
