//! The public `ordo.v1.Queue` service: wire structs to the broker's queue calls and back.

use std::pin::Pin;

use ordo_broker::BrokerError;
use ordo_broker::Queue;
use ordo_broker::QueueConfig;
use ordo_broker::QueueDelivery;
use ordo_broker::Receipt;
use ordo_broker::ReceiveOptions;
use ordo_broker::SettleAction;
use ordo_broker::Settled;
use ordo_proto::v1 as pb;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::deadline::request_timeout;
use crate::services::Services;
use crate::status::to_status;

fn config_from_wire(config: Option<pb::QueueConfig>) -> QueueConfig {
    let config = config.unwrap_or_default();
    QueueConfig {
        visibility_timeout_ms: config.visibility_timeout_ms,
        max_deliveries: config.max_deliveries,
        key_ordered: config.key_ordered,
        delay_ms: config.delay_ms,
        in_flight_max: config.in_flight_max,
        dead_letter_topic: config.dead_letter_topic,
    }
}

fn queue_into_wire(queue: Queue) -> pb::QueueInfo {
    let config = queue.config;
    pb::QueueInfo {
        name: queue.name,
        topic: queue.topic,
        partitions: queue.partitions.len() as u32,
        config: Some(pb::QueueConfig {
            visibility_timeout_ms: config.visibility_timeout_ms,
            max_deliveries: config.max_deliveries,
            key_ordered: config.key_ordered,
            delay_ms: config.delay_ms,
            in_flight_max: config.in_flight_max,
            dead_letter_topic: config.dead_letter_topic,
        }),
    }
}

fn delivery_into_wire(delivery: QueueDelivery) -> pb::QueueMessage {
    pb::QueueMessage {
        receipt: Some(pb::Receipt {
            partition: delivery.partition,
            offset: delivery.offset,
            delivery: delivery.delivery,
        }),
        lease_until_ms: i64::try_from(delivery.lease_until_ms).unwrap_or(i64::MAX),
        record: Some(pb::StoredRecord {
            offset: delivery.offset,
            key: delivery.key,
            value: delivery.value,
            headers: delivery
                .headers
                .into_iter()
                .map(|(key, value)| pb::Header { key, value })
                .collect(),
            timestamp_ms: delivery.timestamp_ms,
        }),
    }
}

fn receipts_from_wire(receipts: Vec<pb::Receipt>) -> Vec<(u32, Receipt)> {
    receipts
        .into_iter()
        .map(|receipt| {
            (
                receipt.partition,
                Receipt {
                    offset: receipt.offset,
                    delivery: receipt.delivery,
                },
            )
        })
        .collect()
}

fn settled_into_wire(settled: Vec<Settled>) -> pb::SettleResponse {
    pb::SettleResponse {
        outcomes: settled
            .into_iter()
            .map(|outcome| match outcome {
                Settled::Done => pb::SettleOutcome::Done,
                Settled::NotHeld => pb::SettleOutcome::NotHeld,
                Settled::Unknown => pb::SettleOutcome::Unknown,
            } as i32)
            .collect(),
    }
}

impl Services {
    fn queue_timeout<T>(&self, request: &Request<T>) -> std::time::Duration {
        request_timeout(
            request.metadata(),
            self.broker.queues_config().call_timeout(),
        )
    }

    async fn settle_call(
        &self,
        queue: &str,
        action: SettleAction,
        receipts: Vec<pb::Receipt>,
        timeout: std::time::Duration,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let settled = self
            .broker
            .settle(queue, action, receipts_from_wire(receipts), timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(settled_into_wire(settled)))
    }
}

#[tonic::async_trait]
impl pb::queue_server::Queue for Services {
    async fn create_queue(
        &self,
        request: Request<pb::CreateQueueRequest>,
    ) -> Result<Response<pb::CreateQueueResponse>, Status> {
        let timeout = self.queue_timeout(&request);
        let request = request.into_inner();
        let queue = self
            .broker
            .create_queue(
                &request.name,
                &request.topic,
                config_from_wire(request.config),
                timeout,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateQueueResponse {
            queue: Some(queue_into_wire(queue)),
        }))
    }

    async fn delete_queue(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Result<Response<pb::DeleteQueueResponse>, Status> {
        let timeout = self.queue_timeout(&request);
        self.broker
            .delete_queue(&request.into_inner().name, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteQueueResponse {}))
    }

    async fn list_queues(
        &self,
        _request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        Ok(Response::new(pb::ListQueuesResponse {
            queues: self
                .broker
                .list_queues()
                .into_iter()
                .map(queue_into_wire)
                .collect(),
        }))
    }

    async fn describe_queue(
        &self,
        request: Request<pb::DescribeQueueRequest>,
    ) -> Result<Response<pb::DescribeQueueResponse>, Status> {
        let timeout = self.queue_timeout(&request);
        let (queue, partitions) = self
            .broker
            .describe_queue(&request.into_inner().name, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DescribeQueueResponse {
            queue: Some(queue_into_wire(queue)),
            partitions: partitions
                .into_iter()
                .map(|status| pb::QueuePartitionStatus {
                    partition: status.partition,
                    floor: status.floor,
                    log_end: status.log_end,
                    available: status.available,
                    in_flight: status.in_flight,
                    delayed: status.delayed,
                    dead_lettering: status.dead_lettering,
                    oldest_timestamp_ms: status
                        .oldest_timestamp_ms
                        .map(|timestamp| i64::try_from(timestamp).unwrap_or(i64::MAX)),
                    acked: status.acked,
                    redeliveries: status.redeliveries,
                    lease_expiries: status.lease_expiries,
                    dead_lettered: status.dead_lettered,
                    leader: u32::try_from(status.leader).unwrap_or(u32::MAX),
                })
                .collect(),
        }))
    }

    type ReceiveStream =
        Pin<Box<dyn Stream<Item = Result<pb::ReceiveResponse, Status>> + Send + 'static>>;

    async fn receive(
        &self,
        request: Request<pb::ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let request = request.into_inner();
        let permit = self.subscriptions.clone().try_acquire_owned().map_err(|_| {
            to_status(BrokerError::ResourceExhausted(
                "too many Subscribe and Receive streams open on this node (grpc.subscriptions_max); close some".into(),
            ))
        })?;
        let (consumer_id, stream) = self
            .broker
            .receive(ReceiveOptions {
                queue: request.queue,
                consumer_id: request.consumer_id,
                max_in_flight: request.max_in_flight,
                max_in_flight_bytes: request.max_in_flight_bytes,
                visibility_timeout_ms: request.visibility_timeout_ms,
            })
            .await
            .map_err(to_status)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(stream).map(move |batch| {
            let _permit = &permit;
            match batch {
                Ok(messages) => Ok(pb::ReceiveResponse {
                    consumer_id: consumer_id.clone(),
                    messages: messages.into_iter().map(delivery_into_wire).collect(),
                }),
                Err(error) => Err(to_status(error)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let timeout = self.queue_timeout(&request);
        let request = request.into_inner();
        self.settle_call(&request.queue, SettleAction::Ack, request.receipts, timeout)
            .await
    }

    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let timeout = self.queue_timeout(&request);
        let request = request.into_inner();
        let action = SettleAction::Nack {
            delay_ms: request.delay_ms,
        };
        self.settle_call(&request.queue, action, request.receipts, timeout)
            .await
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let timeout = self.queue_timeout(&request);
        let request = request.into_inner();
        let action = SettleAction::Extend {
            visibility_ms: request.visibility_timeout_ms,
        };
        self.settle_call(&request.queue, action, request.receipts, timeout)
            .await
    }

    async fn reject(
        &self,
        request: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let timeout = self.queue_timeout(&request);
        let request = request.into_inner();
        let action = SettleAction::Reject {
            reason: request.reason,
        };
        self.settle_call(&request.queue, action, request.receipts, timeout)
            .await
    }
}
