//! The codec of every Ordo service: prost's, except that bytes which do not decode as the
//! expected message are refused as INVALID_ARGUMENT with reason `MALFORMED_MESSAGE` (prost's
//! codec says INTERNAL with no reason, which tells a caller nothing it can act on).
//!
//! The generated servers and clients both use it (`codec_path` in `build.rs`), so a client that
//! receives an undecodable answer sees the same code and reason.

use tonic::Status;
use tonic::codec::BufferSettings;
use tonic::codec::Codec;
use tonic::codec::DecodeBuf;
use tonic::codec::Decoder;
use tonic_prost::ProstCodec;
use tonic_prost::ProstEncoder;
use tonic_types::ErrorDetails;
use tonic_types::StatusExt;

use crate::errors::DOMAIN;
use crate::errors::reason;

/// A [`Codec`] for prost messages with Ordo's decode error.
#[derive(Debug, Clone)]
pub struct OrdoCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for OrdoCodec<T, U> {
    fn default() -> Self {
        OrdoCodec {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for OrdoCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = OrdoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        OrdoDecoder {
            _message: std::marker::PhantomData,
        }
    }
}

/// Decodes one prost message; see the module doc for its error.
#[derive(Debug, Clone)]
pub struct OrdoDecoder<U> {
    _message: std::marker::PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for OrdoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(malformed)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The status of a message that is not valid protobuf for its method. The decode error is its
/// source: a status with a source was made by this process's own gRPC stack, so a client that
/// fails to decode an *answer* treats it as a local failure after sending (outcome unknown for
/// a write), never as the server's refusal. A server sends it without the source.
fn malformed(error: prost::DecodeError) -> Status {
    let mut status = Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!(
            "the message does not decode as the protobuf message this method takes ({error}); build the client from Ordo's proto/"
        ),
        ErrorDetails::with_error_info(
            reason::MALFORMED_MESSAGE,
            DOMAIN,
            std::collections::HashMap::new(),
        ),
    );
    status.set_source(std::sync::Arc::new(error));
    status
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Bytes that are not the method's message are INVALID_ARGUMENT with reason
    /// MALFORMED_MESSAGE, not INTERNAL, and carry the decode error as their source (so the
    /// process that made the status knows it is its own).
    #[test]
    fn undecodable_bytes_are_invalid_argument() {
        let error = crate::v1::ProduceRequest::decode(&[0xff_u8, 0xff, 0xff][..])
            .expect_err("not a message");
        let status = malformed(error);
        assert!(std::error::Error::source(&status).is_some());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            crate::errors::reason_of(&status).as_deref(),
            Some(reason::MALFORMED_MESSAGE)
        );
    }
}
