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
