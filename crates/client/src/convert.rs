//! Conversions between the wire structs of `ordo-proto` and the client's domain types.
//!
//! This is the only module that reads or builds an `ordo_proto::v1` message field by field.
//! Conversions from the wire are fallible where the server could send something the client
//! cannot interpret (a required message field left empty), and say so with
//! [`ClientError::Protocol`] instead of inventing a value.

use ordo_proto::v1 as proto;

use crate::error::ClientError;
use crate::types::{
    ClusterStatus, FetchResult, NodeStatus, PartitionDescription, RecordAck, ReplicaMove,
    ReplicaStatus, StartAt, StoredRecord, TopicDescription, TopicSummary,
};

impl From<proto::RecordAck> for RecordAck {
    fn from(ack: proto::RecordAck) -> Self {
        RecordAck {
            partition: ack.partition,
            offset: ack.offset,
        }
    }
}

impl From<proto::FetchResponse> for FetchResult {
    fn from(response: proto::FetchResponse) -> Self {
        FetchResult {
            partition: response.partition,
            records: response
                .records
                .into_iter()
                .map(StoredRecord::from)
                .collect(),
            high_watermark: response.high_watermark,
            log_start_offset: response.log_start_offset,
        }
    }
}

impl From<StartAt> for proto::subscribe_request::Start {
    fn from(start: StartAt) -> Self {
        match start {
            StartAt::Beginning => proto::subscribe_request::Start::FromBeginning(true),
            StartAt::End => proto::subscribe_request::Start::FromEnd(true),
            StartAt::Offset(offset) => proto::subscribe_request::Start::Offset(offset),
        }
    }
}

impl From<proto::TopicSummary> for TopicSummary {
    fn from(topic: proto::TopicSummary) -> Self {
        TopicSummary {
            name: topic.name,
            partitions: topic.partitions,
            replication_factor: topic.replication_factor,
        }
    }
}

impl From<proto::ReplicaStatus> for ReplicaStatus {
    fn from(replica: proto::ReplicaStatus) -> Self {
        ReplicaStatus {
            node_id: replica.node_id,
            lag: replica.lag,
        }
    }
}

impl From<proto::PartitionDescription> for PartitionDescription {
    fn from(partition: proto::PartitionDescription) -> Self {
        PartitionDescription {
            partition: partition.partition,
            leader: partition.leader,
            replicas: partition.replicas,
            high_watermark: partition.high_watermark,
            log_start_offset: partition.log_start_offset,
            bytes: partition.bytes,
            term: partition.term,
            replica_status: partition
                .replica_status
                .into_iter()
                .map(ReplicaStatus::from)
                .collect(),
        }
    }
}

impl From<proto::TopicDescription> for TopicDescription {
    fn from(topic: proto::TopicDescription) -> Self {
        let mut partitions: Vec<PartitionDescription> = topic
            .partitions
            .into_iter()
            .map(PartitionDescription::from)
            .collect();
        partitions.sort_by_key(|partition| partition.partition);
        TopicDescription {
            name: topic.name,
            replication_factor: topic.replication_factor,
            config: topic
                .config
                .map(|config| config.entries.into_iter().collect())
                .unwrap_or_default(),
            partitions,
        }
    }
}

/// The topic inside a create or describe answer, which proto3 makes optional on the wire.
pub(crate) fn required_topic(
    topic: Option<proto::TopicDescription>,
    call: &str,
) -> Result<TopicDescription, ClientError> {
    topic
        .map(TopicDescription::from)
        .ok_or_else(|| ClientError::Protocol {
            message: format!("{call} answer has no topic"),
        })
}

impl From<proto::NodeStatus> for NodeStatus {
    fn from(node: proto::NodeStatus) -> Self {
        NodeStatus {
            node_id: node.node_id,
            address: node.address,
            reachable: node.reachable,
            leader_count: node.leader_count,
            replica_count: node.replica_count,
            state: node.state,
            metadata_role: node.metadata_role,
        }
    }
}

impl From<proto::ReplicaMove> for ReplicaMove {
    fn from(view: proto::ReplicaMove) -> Self {
        ReplicaMove {
            owner: view.owner,
            partition: view.partition,
            from: view.from,
            to: view.to,
        }
    }
}

impl From<proto::ClusterStatusResponse> for ClusterStatus {
    fn from(status: proto::ClusterStatusResponse) -> Self {
        let mut nodes: Vec<NodeStatus> = status.nodes.into_iter().map(NodeStatus::from).collect();
        nodes.sort_by_key(|node| node.node_id);
        ClusterStatus {
            answered_by: status.answered_by,
            metadata_leader: status.metadata_leader,
            metadata_term: status.metadata_term,
            nodes,
            topics: status.topics,
            partitions: status.partitions,
            moves: status.moves.into_iter().map(ReplicaMove::from).collect(),
        }
    }
}

/// One request of a ProduceStream.
pub(crate) fn produce_stream_request(
    id: u64,
    request: proto::ProduceRequest,
    timeout_ms: u32,
) -> proto::ProduceStreamRequest {
    proto::ProduceStreamRequest {
        id,
        request: Some(request),
        timeout_ms,
    }
}

/// One answer of a ProduceStream: its id and what a unary Produce would have returned. An
/// error is rebuilt as the status a unary call would have ended with, details included, so
/// [`ClientError::from_status`] reads both alike.
pub(crate) fn produce_stream_answer(
    answer: proto::ProduceStreamResponse,
) -> (u64, Result<proto::ProduceResponse, tonic::Status>) {
    use proto::produce_stream_response::Result as Answer;
    let result = match answer.result {
        Some(Answer::Response(response)) => Ok(response),
        Some(Answer::Error(error)) => Err(tonic::Status::with_details(
            tonic::Code::from_i32(error.code),
            error.message,
            error.details,
        )),
        None => Err(tonic::Status::internal(
            "protocol error: a ProduceStream answer carried neither a response nor an error",
        )),
    };
    (answer.id, result)
}

/// The acknowledgements of a produce of `sent` records, checked to be one per record.
pub(crate) fn produce_acks(
    response: proto::ProduceResponse,
    sent: usize,
) -> Result<Vec<RecordAck>, ClientError> {
    if response.acks.len() != sent {
        return Err(ClientError::Protocol {
            message: format!(
                "produce of {sent} records answered with {} acknowledgements",
                response.acks.len()
            ),
        });
    }
    Ok(response.acks.into_iter().map(RecordAck::from).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;

    use super::*;

    /// A fetch answer converts record by record and reports the next offset to read.
    #[test]
    fn fetch_response_converts() {
        let response = proto::FetchResponse {
            partition: 2,
            records: vec![
                proto::StoredRecord {
                    offset: 7,
                    key: None,
                    value: Bytes::from_static(b"a"),
                    headers: vec![proto::Header {
                        key: "h".into(),
                        value: Bytes::from_static(b"x"),
                    }],
                    timestamp_ms: 1,
                },
                proto::StoredRecord {
                    offset: 8,
                    key: Some(Bytes::from_static(b"k")),
                    value: Bytes::from_static(b"b"),
                    headers: Vec::new(),
                    timestamp_ms: 2,
                },
            ],
            high_watermark: 9,
            log_start_offset: 3,
        };
        let result = FetchResult::from(response);
        assert_eq!(result.partition, 2);
        assert_eq!(result.high_watermark, 9);
        assert_eq!(result.log_start_offset, 3);
        assert_eq!(result.records.len(), 2);
        assert_eq!(
            result.records[0].headers,
            vec![("h".to_owned(), Bytes::from_static(b"x"))]
        );
        assert_eq!(result.records[1].key, Some(Bytes::from_static(b"k")));
        assert_eq!(result.next_offset(), Some(9));
    }

    /// An empty fetch has no next offset: the caller keeps its own.
    #[test]
    fn empty_fetch_has_no_next_offset() {
        let result = FetchResult::from(proto::FetchResponse::default());
        assert_eq!(result.next_offset(), None);
    }

    /// Each start position maps to its oneof case.
    #[test]
    fn start_at_maps_to_oneof() {
        use proto::subscribe_request::Start;
        assert_eq!(Start::from(StartAt::Beginning), Start::FromBeginning(true));
        assert_eq!(Start::from(StartAt::End), Start::FromEnd(true));
        assert_eq!(Start::from(StartAt::Offset(5)), Start::Offset(5));
    }

    /// A topic description sorts partitions and copies config and replica progress.
    #[test]
    fn topic_description_converts() {
        let partition = |number: u32| proto::PartitionDescription {
            partition: number,
            leader: Some(1),
            replicas: vec![1, 2, 3],
            high_watermark: 10,
            log_start_offset: 0,
            bytes: 0,
            term: 4,
            replica_status: vec![
                proto::ReplicaStatus {
                    node_id: 2,
                    lag: Some(0),
                },
                proto::ReplicaStatus {
                    node_id: 3,
                    lag: None,
                },
            ],
        };
        let wire = proto::TopicDescription {
            name: "demo".into(),
            replication_factor: 3,
            config: Some(proto::TopicConfig {
                entries: HashMap::from([("retention".to_owned(), "1d".to_owned())]),
            }),
            partitions: vec![partition(1), partition(0)],
        };
        let topic = required_topic(Some(wire), "describe").expect("topic is present");
        assert_eq!(topic.name, "demo");
        assert_eq!(
            topic.config.get("retention").map(String::as_str),
            Some("1d")
        );
        let numbers: Vec<u32> = topic.partitions.iter().map(|p| p.partition).collect();
        assert_eq!(numbers, vec![0, 1]);
        assert_eq!(topic.partitions[0].replica_status[1].lag, None);
        assert_eq!(topic.partitions[0].term, 4);
    }

    /// A create or describe answer without its topic is a protocol error, not a default.
    #[test]
    fn missing_topic_is_protocol_error() {
        let error = required_topic(None, "create_topic").expect_err("topic is missing");
        assert!(matches!(error, ClientError::Protocol { .. }));
    }

    /// Acknowledgements must match the records sent one for one.
    #[test]
    fn produce_acks_are_checked() {
        let response = proto::ProduceResponse {
            duplicate: false,
            acks: vec![proto::RecordAck {
                partition: 1,
                offset: 5,
            }],
        };
        let acks = produce_acks(response.clone(), 1).expect("one ack for one record");
        assert_eq!(
            acks,
            vec![RecordAck {
                partition: 1,
                offset: 5
            }]
        );
        let error = produce_acks(response, 2).expect_err("one ack for two records");
        assert!(matches!(error, ClientError::Protocol { .. }));
    }

    /// Cluster status sorts nodes by id and keeps every field.
    #[test]
    fn cluster_status_converts() {
        let node = |id: u64| proto::NodeStatus {
            node_id: id,
            address: format!("127.0.0.1:700{id}"),
            reachable: id != 3,
            leader_count: 1,
            replica_count: 3,
            state: "ACTIVE".into(),
            metadata_role: "VOTER".into(),
        };
        let status = ClusterStatus::from(proto::ClusterStatusResponse {
            answered_by: 2,
            metadata_leader: Some(1),
            metadata_term: 5,
            nodes: vec![node(3), node(1), node(2)],
            topics: 1,
            partitions: 3,
            moves: vec![proto::ReplicaMove {
                owner: "t".into(),
                partition: 0,
                from: vec![1, 2, 3],
                to: vec![4, 2, 3],
            }],
        });
        assert_eq!(status.moves[0].to, vec![4, 2, 3]);
        assert_eq!(status.nodes[0].state, "ACTIVE");
        let ids: Vec<u64> = status.nodes.iter().map(|node| node.node_id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert!(!status.nodes[2].reachable);
        assert_eq!(status.metadata_leader, Some(1));
    }

    /// Byte fields serialize as strings when UTF-8 and as hex otherwise.
    #[test]
    fn bytes_serialize_losslessly() {
        let record = StoredRecord {
            offset: 1,
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(&[0xff, 0x00]),
            headers: vec![("h".to_owned(), Bytes::from_static(b"v"))],
            timestamp_ms: 3,
        };
        let json = serde_json::to_string(&record).expect("records serialize");
        assert!(json.contains("\"key\":\"k\""), "{json}");
        assert!(json.contains("\"value\":{\"hex\":\"ff00\"}"), "{json}");
        assert!(
            json.contains("\"headers\":[{\"key\":\"h\",\"value\":\"v\"}]"),
            "{json}"
        );
    }
}
