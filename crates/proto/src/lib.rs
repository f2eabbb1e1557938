//! Generated gRPC code for Ordo's public API (`ordo.v1`) and the node-to-node service
//! (`ordo.internal.v1`).
//!
//! Besides the generated code and the reflection descriptor, it owns what both ends of the API
//! must agree on, so it is written once:
//! - `record`: [`record::Record`] and [`record::StoredRecord`], the record types the broker and
//!   the Rust client share, and their one conversion to and from the wire.
//! - `errors`: the `ErrorInfo` domain, reasons and metadata keys of every status, and how to tell
//!   a call that never left from one that may have reached the server.
//! - `partition`: which partition a keyed record goes to (FNV-1a), for the broker and clients.
//! - `codec`: the codec of every service (prost's, with undecodable bytes refused as
//!   INVALID_ARGUMENT / `MALFORMED_MESSAGE`).
//!
//! Wire structs stay at the edge: the server and client convert them into domain types and never
//! pass them deep.

pub mod codec;
pub mod errors;
pub mod partition;
pub mod record;

/// The public, versioned API.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ordo.v1");
}

/// The node-to-node service. Not part of the public API.
pub mod internal {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ordo.internal.v1");
}

/// Header marking a `Log/Fetch` that one node forwarded to another: the receiver serves it from
/// its own replica and never forwards it again (so forwarding never loops). Node to node only.
pub const FORWARDED_HEADER: &str = "x-ordo-forwarded";

/// Encoded `FileDescriptorSet` of every Ordo proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ordo_v1_descriptor");
