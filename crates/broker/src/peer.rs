//! The only module that calls other nodes over gRPC: [`Peer`], one remote node as the broker
//! uses it. Each call speaks the contract of `rpc` and returns domain values, never statuses.
//!
//! Every call has a deadline. A node whose address is unknown is "not reached" (nothing sent).

use std::time::Duration;

use bytes::Bytes;
use ordo_proto::errors;
use ordo_proto::errors::reason;
use ordo_proto::internal::ForwardCoordinatorRequest;
use ordo_proto::internal::ForwardMetaRequest;
use ordo_proto::internal::ForwardProduceRequest;
use ordo_proto::internal::GroupStatusRequest;
use ordo_proto::internal::MetaAppliedRequest;
use ordo_proto::internal::MetaReadIndexRequest;
use ordo_proto::internal::internal_client::InternalClient;
use ordo_raft::GroupId;
use ordo_raft::GroupStatus;
use ordo_raft::Peers;
use ordo_raft::StampedBatch;
use tonic::Status;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::Broker;
use crate::BrokerError;
use crate::NodeId;
use crate::fetch::FORWARD_FETCH_GRACE;
use crate::fetch::FetchOutcome;
use crate::fetch::FetchRequest;
use crate::fetch::ForwardFetchError;
use crate::rpc;
use crate::rpc::CallFailure;
use crate::rpc::FORWARDED_HEADER;
use crate::rpc::ForwardOutcome;
use crate::rpc::MetaForward;

/// How long a node waits for another's status report (describe, cluster status).
const GROUP_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// A failed call to another node: what it may have done, and what happened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct CallError {
    /// What the call may have done.
    pub(crate) failure: CallFailure,
    /// What happened, naming the node.
    pub(crate) message: String,
}

/// A node known only by its address (a seed to join through): asked whether a cluster exists,
/// and to let this node join.
pub(crate) struct Seed {
    address: String,
    client: InternalClient<Channel>,
}

/// Why a seed did not let this node join.
#[derive(Debug)]
pub(crate) enum JoinFailure {
    /// The cluster refused: the id or the address is another node's. Retrying changes nothing.
    Refused(String),
    /// No answer, or no metadata leader: retry.
    Unavailable(String),
}

impl Seed {
    /// The seed at `address` (`host:port` or a URI); `None` when the address is not one.
    pub(crate) fn new(address: &str, connect_timeout: Duration) -> Option<Seed> {
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let channel = tonic::transport::Endpoint::from_shared(uri)
            .ok()?
            .connect_timeout(connect_timeout)
            .connect_lazy();
        Some(Seed {
            address: address.to_string(),
            client: InternalClient::new(channel),
        })
    }

    /// Whether the seed holds the metadata group's config (a cluster exists); `None` when it
    /// did not answer.
    pub(crate) async fn formed(&self, timeout: Duration) -> Option<bool> {
        let mut request = tonic::Request::new(ordo_proto::internal::PingRequest { from: 0 });
        request.set_timeout(timeout);
        let response = self.client.clone().ping(request).await.ok()?;
        Some(response.get_ref().formed)
    }

    /// Asks the cluster, through the seed, to take node `id` at `address`.
    pub(crate) async fn join(
        &self,
        id: NodeId,
        address: &str,
        timeout: Duration,
    ) -> Result<(), JoinFailure> {
        let mut request = tonic::Request::new(ordo_proto::internal::JoinRequest {
            node_id: id,
            address: address.to_string(),
        });
        request.set_timeout(timeout);
        match self.client.clone().join(request).await {
            Ok(_) => Ok(()),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) =>
            {
                Err(JoinFailure::Refused(status.message().to_string()))
            }
            Err(status) => Err(JoinFailure::Unavailable(format!(
                "{}: {}",
                self.address,
                status.message()
            ))),
        }
    }
}

/// One remote node.
pub(crate) struct Peer<'a> {
    peers: &'a Peers,
    node: NodeId,
}

impl Broker {
    /// The remote node `node`, to call.
    pub(crate) fn peer(&self, node: NodeId) -> Peer<'_> {
        Peer {
            peers: self.state.node.peers(),
            node,
        }
    }
}

impl Peer<'_> {
    /// The client for this node; a node without a known address is never sent anything.
    fn client(&self) -> Result<InternalClient<Channel>, CallError> {
        self.peers.known_client(self.node).ok_or_else(|| CallError {
            failure: CallFailure::NothingDone,
            message: format!("node {} has no known address", self.node),
        })
    }

    /// The error of a call that failed with `status`.
    fn failed(&self, status: &Status) -> CallError {
        CallError {
            failure: rpc::classify_failure(status),
            message: format!("node {}: {}", self.node, status.message()),
        }
    }

    /// Proposes a batch on the remote, which must lead `group`. A failure says what the call
    /// may have done, with what happened.
    pub(crate) async fn forward_produce(
        &self,
        group: GroupId,
        batch: &StampedBatch,
        timeout: Duration,
    ) -> Result<ForwardOutcome, CallError> {
        let mut client = self.client()?;
        let mut request = tonic::Request::new(ForwardProduceRequest {
            group: group.0,
            batch: batch.batch.clone(),
            count: batch.count,
            producer: batch.producer.map(rpc::stamp_into_wire),
        });
        request.set_timeout(timeout);
        match client.forward_produce(request).await {
            Ok(response) => {
                ForwardOutcome::from_wire(response.get_ref()).ok_or_else(|| CallError {
                    failure: CallFailure::MaybeDone,
                    message: format!("node {} sent a malformed forward answer", self.node),
                })
            }
            Err(status) => Err(self.failed(&status)),
        }
    }

    /// Runs a metadata command on the remote, which must lead the metadata group.
    pub(crate) async fn forward_meta(
        &self,
        command: Bytes,
        timeout: Duration,
    ) -> Result<MetaForward, CallError> {
        let mut client = self.client()?;
        let mut request = tonic::Request::new(ForwardMetaRequest { command });
        request.set_timeout(timeout);
        match client.forward_meta(request).await {
            Ok(response) => Ok(MetaForward::from_wire(response.into_inner())),
            Err(status) => Err(self.failed(&status)),
        }
    }

    /// Runs a consumer group request on the remote, which must lead the coordinator shard.
    pub(crate) async fn forward_coordinator(
        &self,
        group: GroupId,
        request: Bytes,
        timeout: Duration,
    ) -> Result<crate::coordinator::CoordinatorOutcome, CallError> {
        let mut client = self.client()?;
        let mut request = tonic::Request::new(ForwardCoordinatorRequest {
            group: group.0,
            request,
        });
        request.set_timeout(timeout);
        match client.forward_coordinator(request).await {
            Ok(response) => {
                postcard::from_bytes(&response.get_ref().outcome).map_err(|error| CallError {
                    failure: CallFailure::MaybeDone,
                    message: format!(
                        "node {} sent an undecodable coordinator answer: {error}",
                        self.node
                    ),
                })
            }
            Err(status) => Err(self.failed(&status)),
        }
    }

    /// The metadata read index from the remote; `None` when it is not the leader or did not
    /// answer.
    pub(crate) async fn meta_read_index(&self, timeout: Duration) -> Option<u64> {
        let mut client = self.client().ok()?;
        let mut request = tonic::Request::new(MetaReadIndexRequest {});
        request.set_timeout(timeout);
        let response = client.meta_read_index(request).await.ok()?;
        rpc::read_index_from_wire(response.get_ref())
    }

    /// Whether the remote applied the metadata log up to `index` within `timeout`.
    pub(crate) async fn meta_applied(&self, index: u64, timeout: Duration) -> bool {
        let Ok(mut client) = self.client() else {
            return false;
        };
        let mut request = tonic::Request::new(MetaAppliedRequest { index });
        request.set_timeout(timeout);
        client
            .meta_applied(request)
            .await
            .is_ok_and(|response| response.get_ref().applied)
    }

    /// The remote's status of `groups`; `None` when it did not answer.
    pub(crate) async fn group_status(&self, groups: Vec<u64>) -> Option<Vec<GroupStatus>> {
        let mut client = self.client().ok()?;
        let mut request = tonic::Request::new(GroupStatusRequest { groups });
        request.set_timeout(GROUP_STATUS_TIMEOUT);
        let response = client.group_status(request).await.ok()?;
        Some(
            response
                .into_inner()
                .groups
                .into_iter()
                .map(rpc::group_status_from_wire)
                .collect(),
        )
    }

    /// An offset-for-time lookup served by the remote's replica (public `Log/OffsetsForTime`,
    /// marked as forwarded); the error says why it did not answer.
    pub(crate) async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<crate::time::TimeOffset, String> {
        let channel = self
            .peers
            .channel(self.node)
            .ok_or_else(|| format!("node {} has no known address", self.node))?;
        let mut client = ordo_proto::v1::log_client::LogClient::new(channel);
        let mut request = tonic::Request::new(ordo_proto::v1::OffsetsForTimeRequest {
            topic: topic.to_owned(),
            partition,
            timestamp_ms,
        });
        request.metadata_mut().insert(
            FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        request.set_timeout(GROUP_STATUS_TIMEOUT * 5);
        match client.offsets_for_time(request).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(crate::time::TimeOffset {
                    found: response.offset.zip(response.timestamp_ms),
                    high_watermark: response.high_watermark,
                })
            }
            Err(status) => Err(format!("node {}: {}", self.node, status.message())),
        }
    }

    /// A fetch served by the remote (public `Log/Fetch`, marked as forwarded so it is not
    /// forwarded again).
    pub(crate) async fn fetch(
        &self,
        fetch: &FetchRequest<'_>,
    ) -> Result<FetchOutcome, ForwardFetchError> {
        let channel = self.peers.channel(self.node).ok_or_else(|| {
            ForwardFetchError::NotServed(format!("node {} has no known address", self.node))
        })?;
        let mut client = ordo_proto::v1::log_client::LogClient::new(channel)
            .max_decoding_message_size(usize::MAX);
        let mut request = tonic::Request::new(ordo_proto::v1::FetchRequest {
            topic: fetch.topic.to_string(),
            partition: fetch.partition,
            offset: fetch.offset,
            max_bytes: fetch.max_bytes.min(u64::from(u32::MAX)) as u32,
            max_wait_ms: fetch.max_wait.as_millis().min(u128::from(u32::MAX)) as u32,
        });
        request.metadata_mut().insert(
            FORWARDED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        request.set_timeout(fetch.max_wait + FORWARD_FETCH_GRACE);
        match client.fetch(request).await {
            Ok(response) => Ok(rpc::fetch_from_wire(response.into_inner())),
            Err(status) => Err(fetch_failure(&status, fetch, self.node)),
        }
    }
}

/// The remote's verdict on a fetch, by reason: a request it judged (out of range, no such topic
/// or partition) is the caller's answer; anything else (no leader, shutting down, unreachable)
/// means it did not serve the read.
fn fetch_failure(status: &Status, fetch: &FetchRequest<'_>, node: NodeId) -> ForwardFetchError {
    let info = status.get_details_error_info();
    let metadata = |key: &str| {
        info.as_ref()
            .and_then(|info| info.metadata.get(key))
            .and_then(|value| value.parse::<u64>().ok())
    };
    match errors::reason_of(status).as_deref() {
        Some(reason::OFFSET_OUT_OF_RANGE) => {
            ForwardFetchError::Answered(BrokerError::OffsetOutOfRange {
                offset: fetch.offset,
                start: metadata(errors::metadata::START_OFFSET).unwrap_or(0),
                end: metadata(errors::metadata::END_OFFSET).unwrap_or(0),
            })
        }
        Some(reason::TOPIC_NOT_FOUND) => {
            ForwardFetchError::Answered(BrokerError::TopicNotFound(fetch.topic.to_string()))
        }
        Some(reason::PARTITION_NOT_FOUND) => {
            ForwardFetchError::Answered(BrokerError::PartitionNotFound {
                topic: fetch.topic.to_string(),
                partition: fetch.partition,
                partitions: metadata(errors::metadata::PARTITIONS).unwrap_or(0) as u32,
            })
        }
        _ => ForwardFetchError::NotServed(format!("node {node}: {}", status.message())),
    }
}
