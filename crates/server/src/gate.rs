//! The gate in front of the public services: a node drained and removed from the cluster no
//! longer receives the metadata, so what it would answer is stale. It refuses every public call
//! with UNAVAILABLE (clients move on to another endpoint); the internal service and health stay
//! open.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;

use ordo_broker::Broker;

/// The path prefix of the public services (`ordo.v1.Log`, `Admin`, ...).
const PUBLIC_PREFIX: &str = "/ordo.v1.";

/// Wraps every service of the server (see the module doc).
#[derive(Clone)]
pub(crate) struct RemovedGateLayer {
    pub(crate) broker: Broker,
}

impl<S> tower_layer::Layer<S> for RemovedGateLayer {
    type Service = RemovedGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RemovedGate {
            inner,
            broker: self.broker.clone(),
        }
    }
}

/// See [`RemovedGateLayer`].
#[derive(Clone)]
pub(crate) struct RemovedGate<S> {
    inner: S,
    broker: Broker,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for RemovedGate<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with(PUBLIC_PREFIX) && self.broker.removed() {
            let status = crate::status::removed(self.broker.node_id());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}
