//! Encoding of everything this crate stores or sends: postcard (compact, serde-based).
//! Decoding failures are `io::Error`s of kind `InvalidData`: bad bytes from disk or a peer are
//! errors, never panics.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes a value. Encoding into a `Vec` cannot fail for our types; an error here is a bug in a
/// type's `Serialize` impl, reported as an I/O error rather than a panic.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, std::io::Error> {
    postcard::to_stdvec(value)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
}

/// Decodes a value.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, std::io::Error> {
    postcard::from_bytes(bytes)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
}
