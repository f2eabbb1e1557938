//! Async Rust client for Ordo's public gRPC API (`ordo.v1`).
//!
//! ```no_run
//! # async fn example() -> Result<(), ordo_client::ClientError> {
//! use ordo_client::{Client, Record, StartAt};
//! use futures::StreamExt;
//!
//! let client = Client::connect(["127.0.0.1:7001".to_owned()]).await?;
//! client.create_topic("demo", 3, 3).await?;
//! let acks = client.produce("demo", None, vec![Record::new("hello").with_key("k")]).await?;
//! let mut records = client.subscribe("demo", acks[0].partition, StartAt::Beginning, 1 << 20).await?;
//! while let Some(batch) = records.next().await {
//!     for record in batch?.records {
//!         println!("{} {:?}", record.offset, record.value);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - `client`: [`Client`] and [`ClientOptions`]: endpoints, channels, deadlines, retries.
//! - `produce`: the produce path of [`Client`]: routing, batching, pipelining, retries.
//! - `subscribe`: [`Subscription`], a record stream that resumes after a broken connection.
//! - `batch`: queues of concurrent produce calls per partition, sent together.
//! - `pipe`: pipelined produce calls on one `ProduceStream` per endpoint.
//! - `routing`: partition leaders of topics, so produce calls skip the forwarding hop.
//! - `group`: the consumer group calls of [`Client`] and their types.
//! - `consumer`: [`GroupConsumer`], a consumer group member (heartbeats in a task of its own,
//!   follows the assignment, fetches, commits, leaves on drop).
//! - `error`: [`ClientError`] and the one function that builds it from a gRPC status.
//! - `types`: the domain types callers build and receive.
//! - `convert`: the only place wire structs are read or built field by field.
//!
//! This crate depends on `ordo-proto` and no other Ordo crate: it speaks only the public API.
//! No wire struct appears in its public API.

mod batch;
mod client;
mod consumer;
mod convert;
mod error;
mod group;
mod idempotence;
mod pipe;
mod produce;
mod queue;
mod routing;
mod subscribe;
mod types;

pub use client::{Client, ClientOptions};
pub use consumer::{GroupConsumer, GroupConsumerOptions, GroupEvent, OffsetReset};
pub use error::{ClientError, Effect};
pub use group::{
    CommittedOffset, GroupAssignment, GroupDescription, GroupHeartbeat, GroupMember,
    GroupPartition, GroupSummary, ResetTo, TimeOffset, TopicPartition,
};
pub use queue::{
    DELIVER_AT_HEADER, QueueAcker, QueueConsumer, QueueConsumerOptions, QueueDescription,
    QueueInfo, QueueMessage, QueuePartitionInfo, QueueSettings, Receipt, SettleOutcome,
};
pub use subscribe::Subscription;
pub use types::{
    ClusterStatus, FetchResult, NodeStatus, PartitionDescription, Record, RecordAck, ReplicaMove,
    ReplicaStatus, StartAt, StoredRecord, TopicDescription, TopicSummary,
};
