//! Pipelined produce: every produce call to one endpoint travels on one long-lived
//! `ProduceStream`, tagged with an id, and its answer comes back on the same stream whenever it
//! completes. This is how a Kafka producer or a NATS connection carries many requests in flight
//! on one connection: the per-call HTTP/2 stream, headers and trailers are paid once per stream
//! instead of once per call.
//!
//! Each call still has [`crate::Client`]'s semantics: it is handed to `Client::call_on` as one
//! attempt returning a `Status`, so deadlines, retries and error mapping are the unary ones. The
//! only thing decided here is what a broken stream means for the calls on it:
//! - a call not yet handed to the stream was never sent: UNAVAILABLE, which is retryable;
//! - a call sent without an answer has an unknown outcome: a status with the `OUTCOME_UNKNOWN`
//!   reason, never retried.
//!
//! A node that shuts down drains its streams: it answers what it has read, refuses what arrives
//! for a short while with UNAVAILABLE / `SHUTTING_DOWN` (retried on another endpoint), then ends
//! the stream. The first such refusal closes the pipe to new calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use ordo_proto::v1 as proto;
use ordo_proto::v1::log_client::LogClient;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use crate::convert;
use crate::error::{ClientError, REASON_OUTCOME_UNKNOWN};

/// Requests queued on one pipe before callers wait: beyond this they wait for the stream's
/// HTTP/2 flow control, which the server holds back past its own read-ahead bound.
const PIPE_QUEUE: usize = 256;

type Answer = Result<proto::ProduceResponse, Status>;

/// One endpoint's ProduceStream. Dropping it ends the request side; the stream then closes once
/// the server has answered everything sent.
#[derive(Debug)]
pub(crate) struct Pipe {
    requests: mpsc::Sender<proto::ProduceStreamRequest>,
    shared: Arc<Shared>,
}

/// What the pipe and the task reading its answers share.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// False once the answer stream ended; no call may wait on the pipe after that.
    closed: bool,
    next_id: u64,
    /// Calls sent (or being sent) and not yet answered, by id.
    waiting: HashMap<u64, oneshot::Sender<Answer>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (each operation is one
        // insert or remove), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a call from the waiting map when the call ends in any way (answered, failed, or
/// dropped by a caller's timeout), so abandoned calls do not accumulate.
struct Waiting<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiting.remove(&self.id);
    }
}

impl Pipe {
    /// Opens a ProduceStream on `client`; waits for the server's response headers.
    pub(crate) async fn open(
        mut client: LogClient<Channel>,
        endpoint: Arc<str>,
    ) -> Result<Pipe, Status> {
        let (requests, receiver) = mpsc::channel(PIPE_QUEUE);
        let answers = client
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        let shared = Arc::new(Shared::default());
        tokio::spawn(read_answers(answers, Arc::clone(&shared), endpoint));
        Ok(Pipe { requests, shared })
    }

    /// Whether the answer stream is still open, so new calls may use the pipe.
    pub(crate) fn is_open(&self) -> bool {
        !self.shared.lock().closed && !self.requests.is_closed()
    }

    /// Sends one produce request due by `deadline` and waits for its answer. The deadline sent
    /// is what is left of it when the request enters the stream.
    pub(crate) async fn produce(
        &self,
        request: proto::ProduceRequest,
        deadline: Instant,
    ) -> Result<proto::ProduceResponse, Status> {
        let (sender, answer) = oneshot::channel();
        let id = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(never_sent());
            }
            let id = state.next_id;
            state.next_id += 1;
            state.waiting.insert(id, sender);
            id
        };
        let _waiting = Waiting {
            shared: &self.shared,
            id,
        };
        // Waiting for room in the queue is bounded by the deadline; a request that never got
        // in was never sent.
        let permit = match tokio::time::timeout_at(deadline, self.requests.reserve()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => return Err(never_sent()),
            Err(_elapsed) => {
                return Err(Status::unavailable(
                    "the produce stream's queue stayed full until the call's deadline; nothing was written",
                ));
            }
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        permit.send(convert::produce_stream_request(
            id,
            request,
            timeout_millis(timeout),
        ));
        match answer.await {
            Ok(answer) => answer,
            Err(_closed) => Err(outcome_unknown("the produce stream ended".to_owned())),
        }
    }
}

/// Reads answers until the stream ends, then fails every call still waiting.
async fn read_answers(
    mut answers: Streaming<proto::ProduceStreamResponse>,
    shared: Arc<Shared>,
    endpoint: Arc<str>,
) {
    let ended = loop {
        match answers.next().await {
            Some(Ok(message)) => {
                let (id, answer) = convert::produce_stream_answer(message);
                let mut state = shared.lock();
                if answer.as_ref().is_err_and(ClientError::is_shutting_down) {
                    // The node drains this stream before it stops: new calls must not use it
                    // (they would reach a closed stream), so the next call opens another.
                    state.closed = true;
                }
                let waiter = state.waiting.remove(&id);
                drop(state);
                // A missing waiter gave up (its deadline passed locally); nothing to do.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(answer);
                }
            }
            Some(Err(status)) => break status.to_string(),
            None => break "the server ended the stream".to_owned(),
        }
    };
    let waiting = {
        let mut state = shared.lock();
        state.closed = true;
        std::mem::take(&mut state.waiting)
    };
    if !waiting.is_empty() {
        tracing::debug!(%endpoint, calls = waiting.len(), %ended, "produce stream broke with calls in flight");
    }
    for waiter in waiting.into_values() {
        let _ = waiter.send(Err(outcome_unknown(format!(
            "the produce stream to {endpoint} broke before the answer came ({ended})"
        ))));
    }
}

/// The request never left: the stream had already ended. Nothing was written.
fn never_sent() -> Status {
    Status::unavailable(
        "the produce stream had closed before the request was sent; nothing was written",
    )
}

/// The request was sent and its outcome is unknown.
fn outcome_unknown(message: String) -> Status {
    Status::with_error_details(
        Code::Unknown,
        message,
        ErrorDetails::with_error_info(
            REASON_OUTCOME_UNKNOWN,
            ordo_proto::errors::DOMAIN,
            HashMap::new(),
        ),
    )
}

/// A deadline in whole milliseconds for the wire: at least 1 (0 means "server default"),
/// saturating at `u32::MAX`.
fn timeout_millis(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis())
        .unwrap_or(u32::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Effect;

    /// A call that never left is retryable; a call lost with the stream is an unknown outcome.
    #[test]
    fn broken_stream_statuses_map_to_the_right_errors() {
        let error = ClientError::from_status(never_sent(), Effect::Write, "e");
        assert!(error.is_retryable(), "{error:?}");
        let error = ClientError::from_status(outcome_unknown("gone".into()), Effect::Write, "e");
        assert!(
            matches!(error, ClientError::OutcomeUnknown { .. }),
            "{error:?}"
        );
        assert!(!error.is_retryable());
    }

    #[test]
    fn timeouts_round_up_to_a_millisecond_and_saturate() {
        assert_eq!(timeout_millis(Duration::ZERO), 1);
        assert_eq!(timeout_millis(Duration::from_micros(1500)), 1);
        assert_eq!(timeout_millis(Duration::from_secs(10)), 10_000);
        assert_eq!(timeout_millis(Duration::from_secs(u64::MAX)), u32::MAX);
    }
}
