//! Reads the caller's deadline (the `grpc-timeout` header) so the server answers before it
//! passes: an OUTCOME_UNKNOWN the client can read beats a client-side timeout it cannot.

use std::time::Duration;

/// Time kept back from the caller's deadline to send the answer.
const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// Parses a `grpc-timeout` value: digits then one of `H M S m u n`.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The time this request may take: the caller's deadline less a margin, capped by `default`.
pub fn request_timeout(metadata: &tonic::metadata::MetadataMap, default: Duration) -> Duration {
    let caller = metadata
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout);
    match caller {
        Some(caller) => answer_within(caller, default),
        None => default,
    }
}

/// The time a request with the caller's deadline `caller` may take: less a margin to send the
/// answer, capped by `default`.
pub fn answer_within(caller: Duration, default: Duration) -> Duration {
    caller
        .saturating_sub(ANSWER_MARGIN.min(caller / 10))
        .min(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit parses; junk does not.
    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "5", "5x", "-5S", "1234567890S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
