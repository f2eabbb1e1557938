//! Generated gRPC code for Ordo's public API (`ordo.v1`) and the node-to-node service
//! (`ordo.internal.v1`).
//!
//! This crate owns nothing but generated code and the reflection descriptor. Wire structs stay
//! at the edge: the server and client convert them into domain types and never pass them deep.

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

/// Encoded `FileDescriptorSet` of every Ordo proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ordo_v1_descriptor");
