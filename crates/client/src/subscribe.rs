//! [`Subscription`]: the stream returned by [`crate::Client::subscribe`], which reopens itself
//! after a retryable failure, resuming after the last offset it delivered.
//!
//! It owns no task: the stream is driven by whoever polls it, and dropping it closes the gRPC
//! stream. Reopening is bounded by [`crate::ClientOptions::subscribe_retries_max`] consecutive
//! failures.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::stream::BoxStream;
use ordo_proto::v1 as proto;

use crate::client::{Client, EndpointName};
use crate::error::{ClientError, Effect};
use crate::types::{FetchResult, StartAt};

/// A stream of [`FetchResult`]s of one partition, in offset order, without gaps or repeats
/// across reconnections. Ends after yielding an error it cannot recover from.
pub struct Subscription {
    inner: BoxStream<'static, Result<FetchResult, ClientError>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Subscription")
            .finish_non_exhaustive()
    }
}

/// What the stream needs between two messages.
struct State {
    client: Client,
    topic: String,
    partition: u32,
    /// Where a reopened stream must start: after the last record delivered.
    start: StartAt,
    max_bytes: u32,
    open: Option<(tonic::Streaming<proto::FetchResponse>, EndpointName)>,
    /// Consecutive failures since the last message.
    failures: u32,
    finished: bool,
}

impl Subscription {
    pub(crate) fn new(
        client: Client,
        topic: String,
        partition: u32,
        start: StartAt,
        max_bytes: u32,
        stream: tonic::Streaming<proto::FetchResponse>,
        endpoint: EndpointName,
    ) -> Subscription {
        let state = State {
            client,
            topic,
            partition,
            start,
            max_bytes,
            open: Some((stream, endpoint)),
            failures: 0,
            finished: false,
        };
        let inner = futures::stream::unfold(state, |mut state| async move {
            if state.finished {
                return None;
            }
            let item = state.next_item().await;
            if item.is_err() {
                state.finished = true;
            }
            Some((item, state))
        });
        Subscription {
            inner: Box::pin(inner),
        }
    }
}

impl Stream for Subscription {
    type Item = Result<FetchResult, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(context)
    }
}

impl State {
    /// The next message, reopening the stream after retryable failures; an error ends it.
    async fn next_item(&mut self) -> Result<FetchResult, ClientError> {
        loop {
            let error = match self.open.as_mut() {
                None => match self
                    .client
                    .open_subscription(&self.topic, self.partition, self.start, self.max_bytes)
                    .await
                {
                    Ok(open) => {
                        self.open = Some(open);
                        continue;
                    }
                    Err(error) => error,
                },
                Some((stream, endpoint)) => match stream.message().await {
                    Ok(Some(response)) => {
                        self.failures = 0;
                        let result = FetchResult::from(response);
                        self.start = resume_point(self.start, &result);
                        return Ok(result);
                    }
                    Ok(None) => {
                        let error = ClientError::Unavailable {
                            leader_hint: None,
                            leader_address: None,
                            message: format!("{endpoint} ended the subscription"),
                        };
                        self.forget_stream(&error);
                        error
                    }
                    Err(status) => {
                        let error = ClientError::from_status(status, Effect::Read, endpoint);
                        self.forget_stream(&error);
                        error
                    }
                },
            };
            if !error.is_retryable() || self.failures >= self.client.options().subscribe_retries_max
            {
                return Err(error);
            }
            self.failures += 1;
            let backoff = backoff(self.client.options(), self.failures);
            tracing::debug!(
                topic = %self.topic,
                partition = self.partition,
                %error,
                failures = self.failures,
                "reopening subscription"
            );
            tokio::time::sleep(backoff).await;
        }
    }

    /// Drops the broken stream and moves the client off its endpoint.
    fn forget_stream(&mut self, error: &ClientError) {
        if let Some((_, endpoint)) = self.open.take()
            && let Some(index) = self.client.index_of(&endpoint)
        {
            self.client.move_after_failure(index, error);
        }
    }
}

/// Where to reopen after delivering `result`, having started at `start`.
///
/// After records, the offset after the last one. With none, a start at the end becomes the high
/// watermark the server reported, so records appended while reconnecting are not skipped; other
/// starts stay as they were.
fn resume_point(start: StartAt, result: &FetchResult) -> StartAt {
    match (result.next_offset(), start) {
        (Some(next), _) => StartAt::Offset(next),
        (None, StartAt::End) => StartAt::Offset(result.high_watermark),
        (None, start) => start,
    }
}

/// Pause before the `failures`-th consecutive reopening: doubling from the initial backoff.
fn backoff(options: &crate::ClientOptions, failures: u32) -> Duration {
    let factor = 1_u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    options
        .retry_backoff_initial
        .saturating_mul(factor)
        .min(options.retry_backoff_max)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::StoredRecord;

    fn result(offsets: &[u64], high_watermark: u64) -> FetchResult {
        FetchResult {
            partition: 0,
            records: offsets
                .iter()
                .map(|&offset| StoredRecord {
                    offset,
                    key: None,
                    value: Bytes::new(),
                    headers: Vec::new(),
                    timestamp_ms: 0,
                })
                .collect(),
            high_watermark,
            log_start_offset: 0,
        }
    }

    /// After records, a reopened subscription starts right after the last one, whatever the
    /// original start.
    #[test]
    fn resumes_after_last_record() {
        for start in [StartAt::Beginning, StartAt::End, StartAt::Offset(3)] {
            assert_eq!(resume_point(start, &result(&[3, 4], 9)), StartAt::Offset(5));
        }
    }

    /// An empty message pins a start at the end to the reported high watermark, and leaves
    /// other starts alone.
    #[test]
    fn empty_message_pins_end_start() {
        assert_eq!(
            resume_point(StartAt::End, &result(&[], 7)),
            StartAt::Offset(7)
        );
        assert_eq!(
            resume_point(StartAt::Beginning, &result(&[], 7)),
            StartAt::Beginning
        );
        assert_eq!(
            resume_point(StartAt::Offset(2), &result(&[], 7)),
            StartAt::Offset(2)
        );
    }

    /// Backoff doubles from the initial pause and stops at the maximum, without overflow.
    #[test]
    fn backoff_doubles_to_max() {
        let options = crate::ClientOptions::default();
        assert_eq!(backoff(&options, 1), Duration::from_millis(50));
        assert_eq!(backoff(&options, 2), Duration::from_millis(100));
        assert_eq!(backoff(&options, 3), Duration::from_millis(200));
        assert_eq!(backoff(&options, 4), options.retry_backoff_max);
        assert_eq!(backoff(&options, 200), options.retry_backoff_max);
    }
}
