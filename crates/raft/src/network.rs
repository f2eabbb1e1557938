//! The peer connection pool and the client side of the internal Raft RPC.
//!
//! Every group on a node shares ONE HTTP/2 connection per peer ([`Peers`]); each Raft message is
//! a unary `ordo.internal.v1.Internal/Raft` call multiplexed on it, carrying the group id and the
//! postcard-encoded openraft message. The receiving node dispatches by group (see `node`) and
//! answers with a postcard-encoded [`RaftAnswer`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use openraft::OptionalSend;
use openraft::RaftNetworkFactory;
use openraft::error::RPCError;
use openraft::error::ReplicationClosed;
use openraft::error::StreamingError;
use openraft::error::Unreachable;
use openraft::impls::BasicNode;
use openraft::network::RPCOption;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use ordo_proto::internal::RaftKind;
use ordo_proto::internal::RaftRequest;
use ordo_proto::internal::internal_client::InternalClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::GroupId;
use crate::NodeId;
use crate::codec::decode;
use crate::codec::encode;
use crate::types::C;
use crate::types::Snapshot;
use crate::types::SnapshotData;
use crate::types::Vote;

/// Largest message a node accepts or sends on the internal service. A Raft append carries at
/// most [`APPEND_ENTRIES_BYTES_MAX`] of entry payload, or a single larger entry (bounded by the
/// broker's batch limit); a forwarded produce carries at most a batch.
pub const INTERNAL_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Most entry payload bytes in one Raft append RPC: a lagging follower is sent a prefix of the
/// entries openraft offers (at least one) and the rest in the next RPC, so no append can exceed
/// [`INTERNAL_MESSAGE_BYTES_MAX`] (one entry is at most a batch, bounded by the broker's limits).
pub(crate) const APPEND_ENTRIES_BYTES_MAX: usize = 16 << 20;

/// HTTP/2 keepalive ping period on a peer connection: an idle connection to a vanished peer
/// (power loss, network cut: no RST) is noticed within the period plus the timeout below.
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the peer connection is closed (and
/// reconnected on the next call).
const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 flow-control window of one stream to a peer (one RPC), bytes: large enough that an
/// append of several MiB is not throttled by window updates on a high-latency link.
const PEER_STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// HTTP/2 flow-control window of a whole peer connection, shared by every group's RPCs, bytes.
const PEER_CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// The answer to an `Internal/Raft` call, as it travels: openraft's response, or the error of the
/// remote node (its openraft error, or why it could not dispatch the call) as a message. Both
/// ends name this type so the encoding cannot drift; the caller turns the message into a typed
/// [`RpcFailure::Remote`] at once.
pub(crate) type RaftAnswer<T> = Result<T, String>;

/// How many of `entries`, from the first, fit in `bytes_max` of payload (always at least one).
fn entries_within(entries: &[crate::types::Entry], bytes_max: usize) -> usize {
    let mut bytes = 0usize;
    for (n, entry) in entries.iter().enumerate() {
        if let openraft::EntryPayload::Normal(command) = &entry.payload {
            bytes = bytes.saturating_add(command.payload_bytes());
        }
        if bytes > bytes_max && n > 0 {
            return n;
        }
    }
    entries.len()
}

/// Lazily connected channels to every peer, shared by all groups and by request forwarding.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    /// An empty pool whose connection attempts give up after `connect_timeout` (the node's
    /// [`crate::RaftOptions::connect_timeout`]).
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout,
        }
    }

    /// The internal client for `node` at `address`; the channel is created on first use and
    /// replaced when the address changes. Connecting happens lazily, on the first call.
    pub fn client(
        &self,
        node: NodeId,
        address: &str,
    ) -> Result<InternalClient<Channel>, tonic::transport::Error> {
        let mut peers = self
            .inner
            .lock()
            .expect("peers lock is never poisoned: no panics while held");
        if let Some((known, channel)) = peers.get(&node) {
            if known == address {
                return Ok(Self::wrap(channel.clone()));
            }
        }
        let uri = if address.starts_with("http://") || address.starts_with("https://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let channel = Endpoint::from_shared(uri)?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(PEER_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(PEER_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(PEER_STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(PEER_CONNECTION_WINDOW_BYTES))
            .connect_lazy();
        peers.insert(node, (address.to_string(), channel.clone()));
        Ok(Self::wrap(channel))
    }

    /// The internal client for `node` if its address is known.
    pub fn known_client(&self, node: NodeId) -> Option<InternalClient<Channel>> {
        let peers = self
            .inner
            .lock()
            .expect("peers lock is never poisoned: no panics while held");
        peers
            .get(&node)
            .map(|(_, channel)| Self::wrap(channel.clone()))
    }

    /// The shared channel to `node` if its address is known, for the public services.
    pub fn channel(&self, node: NodeId) -> Option<Channel> {
        let peers = self
            .inner
            .lock()
            .expect("peers lock is never poisoned: no panics while held");
        peers.get(&node).map(|(_, channel)| channel.clone())
    }

    /// The address known for `node`, if any.
    pub fn address(&self, node: NodeId) -> Option<String> {
        let peers = self
            .inner
            .lock()
            .expect("peers lock is never poisoned: no panics while held");
        peers.get(&node).map(|(address, _)| address.clone())
    }

    /// Records a node's address, so forwarding can reach it before any Raft traffic did.
    pub fn set_address(&self, node: NodeId, address: &str) {
        if let Err(error) = self.client(node, address) {
            tracing::warn!(node, address, %error, "invalid peer address");
        }
    }

    fn wrap(channel: Channel) -> InternalClient<Channel> {
        InternalClient::new(channel)
            .max_decoding_message_size(INTERNAL_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(INTERNAL_MESSAGE_BYTES_MAX)
    }
}

/// Creates the per-target network clients of one group.
pub(crate) struct NetworkFactory {
    pub(crate) peers: Peers,
    pub(crate) group: GroupId,
    /// A partition's store: its snapshots carry records, read from here (see `snapshot`).
    pub(crate) records: Option<(ordo_storage::GroupStore, Arc<crate::machine::Retention>)>,
    /// Bounds what moves send to new replicas.
    pub(crate) throttle: Arc<crate::throttle::Throttle>,
}

impl RaftNetworkFactory<C> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        // The node table's address wins over the one the membership recorded (a node that
        // moved re-registers).
        let address = self
            .peers
            .address(target)
            .unwrap_or_else(|| node.addr.clone());
        GroupNetwork {
            client: self
                .peers
                .client(target, &address)
                .map_err(|source| RpcFailure::Address { address, source }),
            group: self.group,
            target,
            records: self.records.clone(),
            throttle: self.throttle.clone(),
        }
    }
}

/// One group's link to one target node.
pub(crate) struct GroupNetwork {
    /// The client, or why the target's address cannot be connected to (every RPC then fails
    /// with it until openraft makes a new link).
    client: Result<InternalClient<Channel>, RpcFailure>,
    group: GroupId,
    target: NodeId,
    records: Option<(ordo_storage::GroupStore, Arc<crate::machine::Retention>)>,
    throttle: Arc<crate::throttle::Throttle>,
}

/// Why a Raft RPC got no answer from its target's group. openraft sees each as `Unreachable`
/// and retries (backing off per its own policy).
#[derive(Debug, thiserror::Error)]
enum RpcFailure {
    /// The target's address is not a valid URI.
    #[error("invalid address {address:?}: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    /// The request could not be encoded.
    #[error("encoding the request: {0}")]
    Encode(std::io::Error),
    /// The call failed in transport or on the remote server (timeout, refused, reset, ...).
    #[error("raft rpc to node {target} for group {group}: {message}")]
    Transport {
        target: NodeId,
        group: GroupId,
        message: String,
    },
    /// The answer could not be decoded.
    #[error("undecodable answer: {0}")]
    Decode(std::io::Error),
    /// The remote node answered with an error (see [`RaftAnswer`]).
    #[error("node {target} for group {group}: {message}")]
    Remote {
        target: NodeId,
        group: GroupId,
        message: String,
    },
}

impl GroupNetwork {
    async fn call<Req, Resp>(
        &mut self,
        kind: RaftKind,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, Unreachable<C>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let unreachable = |failure: RpcFailure| Unreachable::new(&failure);
        let client = self
            .client
            .as_mut()
            .map_err(|failure| Unreachable::new(&*failure))?;
        let payload = encode(request).map_err(|error| unreachable(RpcFailure::Encode(error)))?;
        let mut request = tonic::Request::new(RaftRequest {
            group: self.group.0,
            kind: kind as i32,
            payload: payload.into(),
        });
        request.set_timeout(timeout);
        let (target, group) = (self.target, self.group);
        let response = client.raft(request).await.map_err(|status| {
            unreachable(RpcFailure::Transport {
                target,
                group,
                message: status.message().to_string(),
            })
        })?;
        let answer: RaftAnswer<Resp> = decode(&response.into_inner().payload)
            .map_err(|error| unreachable(RpcFailure::Decode(error)))?;
        answer.map_err(|message| {
            unreachable(RpcFailure::Remote {
                target,
                group,
                message,
            })
        })
    }
}

impl GroupNetwork {
    /// Sends a partition snapshot with its records (see `snapshot`).
    async fn stream_snapshot(
        &mut self,
        (store, retention): (ordo_storage::GroupStore, Arc<crate::machine::Retention>),
        vote: Vote,
        snapshot: Snapshot,
        records: crate::machine::SnapshotRecords,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        use crate::snapshot::Message;
        // openraft's deadline is for a whole snapshot in one message (200 ms by default): a
        // chunk of records, and the install that adopts them, get their own.
        let _ = option;
        let ttl = crate::snapshot::CALL_TIMEOUT;
        let last_index = snapshot
            .meta
            .last_log_id
            .as_ref()
            .map_or(0, |log_id| log_id.index);
        let begin = Message::Begin {
            vote: vote.clone(),
            first_index: records.first_index,
            last_index,
        };
        let mut cursor: crate::snapshot::Cursor =
            self.call(RaftKind::SnapshotChunk, &begin, ttl).await?;
        let (group, target) = (self.group, self.target);
        let started = std::time::Instant::now();
        let mut sent_bytes = 0usize;
        loop {
            let read_store = store.clone();
            let read_retention = retention.clone();
            let mut next = cursor;
            let chunk = tokio::task::spawn_blocking(move || {
                crate::snapshot::read_chunk(
                    &read_store,
                    &read_retention,
                    &records,
                    last_index,
                    &mut next,
                )
                .map(|chunk| (chunk, next))
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read);
            let (chunk, next) = match chunk {
                Ok(read) => read,
                Err(error) => {
                    tracing::warn!(%group, target, %error, "snapshot transfer given up");
                    return Err(Unreachable::new(&error).into());
                }
            };
            let Some(chunk) = chunk else {
                break;
            };
            sent_bytes += chunk
                .rows
                .iter()
                .map(|(_, _, bytes)| bytes.len())
                .sum::<usize>();
            sent_bytes += chunk
                .entries
                .iter()
                .map(|(_, bytes)| bytes.len())
                .sum::<usize>();
            if self.throttle.applies(group, target) {
                let bytes = chunk
                    .rows
                    .iter()
                    .map(|(_, _, bytes)| bytes.len())
                    .sum::<usize>()
                    + chunk
                        .entries
                        .iter()
                        .map(|(_, bytes)| bytes.len())
                        .sum::<usize>();
                self.throttle.take(bytes).await;
            }
            let message = crate::snapshot::records_message(vote.clone(), chunk)
                .map_err(|error| Unreachable::new(&RpcFailure::Encode(error)))?;
            self.call::<_, ()>(RaftKind::SnapshotChunk, &message, ttl)
                .await?;
            cursor = next;
        }
        let finish = Message::Finish {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let response = self.call(RaftKind::SnapshotChunk, &finish, ttl).await?;
        tracing::info!(
            %group,
            target,
            last_index,
            bytes = sent_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partition snapshot sent"
        );
        Ok(response)
    }
}

impl RaftNetworkV2<C> for GroupNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let keep = entries_within(&rpc.entries, APPEND_ENTRIES_BYTES_MAX);
        if self.throttle.applies(self.group, self.target) {
            let bytes = rpc.entries[..keep]
                .iter()
                .map(|entry| match &entry.payload {
                    openraft::EntryPayload::Normal(command) => command.payload_bytes(),
                    _ => 0,
                })
                .sum::<usize>();
            self.throttle.take(bytes).await;
        }
        if keep == rpc.entries.len() {
            return Ok(self.call(RaftKind::Append, &rpc, option.hard_ttl()).await?);
        }
        rpc.entries.truncate(keep);
        let last = rpc.entries.last().map(|entry| entry.log_id);
        let response: AppendEntriesResponse<C> =
            self.call(RaftKind::Append, &rpc, option.hard_ttl()).await?;
        Ok(match response {
            AppendEntriesResponse::Success => AppendEntriesResponse::PartialSuccess(last),
            other => other,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        Ok(self.call(RaftKind::Vote, &rpc, option.hard_ttl()).await?)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        Ok(self
            .call(RaftKind::PreVote, &rpc, option.hard_ttl())
            .await?)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        if let Some(store) = self.records.clone()
            && let Some(records) = crate::machine::snapshot_records(snapshot.snapshot.get_ref())
        {
            let stream = self.stream_snapshot(store, vote, snapshot, records, option);
            return tokio::select! {
                result = stream => result,
                closed = cancel => Err(closed.into()),
            };
        }
        let request = (vote, snapshot.meta, snapshot.snapshot.into_inner());
        Ok(self
            .call(RaftKind::Snapshot, &request, option.hard_ttl())
            .await?)
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        Ok(self
            .call(RaftKind::TransferLeader, &request, option.hard_ttl())
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use openraft::EntryPayload;
    use openraft::vote::RaftLeaderId;

    use super::*;
    use crate::types::AppendBatch;
    use crate::types::Command;
    use crate::types::Entry;

    fn entry(index: u64, command: Command) -> Entry {
        Entry {
            log_id: openraft::LogId::new(
                openraft::impls::leader_id_adv::LeaderId::new(1, 1),
                index,
            ),
            payload: EntryPayload::Normal(command),
        }
    }

    fn append(bytes: usize) -> Command {
        Command::Append {
            count: 1,
            batch: Bytes::from(vec![0u8; bytes]),
        }
    }

    /// An append RPC carries a prefix of the entries within the byte budget, always at least
    /// one (a single entry is bounded by the batch limit), and coalesced entries count whole.
    #[test]
    fn append_rpcs_stay_within_the_byte_budget() {
        let entries: Vec<Entry> = (1..=10).map(|index| entry(index, append(100))).collect();
        assert_eq!(entries_within(&entries, 1000), 10);
        assert_eq!(entries_within(&entries, 450), 4);
        assert_eq!(entries_within(&entries, 10), 1, "at least one entry");
        assert_eq!(entries_within(&[], 10), 0);
        let coalesced = Command::Appends(vec![
            AppendBatch {
                count: 2,
                batch: Bytes::from(vec![0u8; 300]),
            },
            AppendBatch {
                count: 1,
                batch: Bytes::from(vec![0u8; 300]),
            },
        ]);
        let entries = vec![
            entry(1, append(100)),
            entry(2, coalesced),
            entry(3, append(1)),
        ];
        assert_eq!(entries_within(&entries, 650), 1);
        assert_eq!(entries_within(&entries, 700), 2);
        assert_eq!(entries_within(&entries, 701), 3);
    }
}
