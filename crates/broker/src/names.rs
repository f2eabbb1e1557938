//! Topic name rules (as Kafka's): 1 to 249 characters of ASCII letters, digits, `.`, `_`, `-`;
//! not `.` or `..`.

use crate::BrokerError;

/// Longest topic name.
pub const TOPIC_NAME_LEN_MAX: usize = 249;

/// Longest producer name, bytes.
pub const PRODUCER_NAME_LEN_MAX: usize = 255;

/// Checks a producer name: up to 255 bytes, no control characters.
pub fn validate_producer_name(name: &str) -> Result<(), BrokerError> {
    validate_label(
        "producer name",
        ordo_proto::errors::reason::INVALID_PRODUCER_NAME,
        name,
        true,
    )
}

/// Checks a name-like string: 1 (0 when `may_be_empty`) to 255 bytes, no control characters.
fn validate_label(
    what: &str,
    reason: &'static str,
    value: &str,
    may_be_empty: bool,
) -> Result<(), BrokerError> {
    if value.is_empty() && !may_be_empty {
        return Err(BrokerError::invalid(reason, format!("{what} is empty")));
    }
    if value.len() > PRODUCER_NAME_LEN_MAX {
        return Err(BrokerError::invalid(
            reason,
            format!(
                "{what} is {} bytes; the limit is {PRODUCER_NAME_LEN_MAX}",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(BrokerError::invalid(
            reason,
            format!("{what} {value:?} contains a control character"),
        ));
    }
    Ok(())
}

/// Checks a consumer group name: 1 to 255 bytes, no control characters.
pub fn validate_group_name(name: &str) -> Result<(), BrokerError> {
    validate_label(
        "group name",
        ordo_proto::errors::reason::INVALID_GROUP_NAME,
        name,
        false,
    )
}

/// Checks a queue name: the rules of a topic name.
pub fn validate_queue_name(name: &str) -> Result<(), BrokerError> {
    validate_topic_name(name).map_err(|error| match error {
        BrokerError::InvalidArgument { message, .. } => BrokerError::invalid(
            ordo_proto::errors::reason::INVALID_QUEUE_NAME,
            message.replace("topic name", "queue name"),
        ),
        other => other,
    })
}

/// Checks a consumer id: like a member id (empty: none).
pub fn validate_consumer_id(id: &str) -> Result<(), BrokerError> {
    validate_label(
        "consumer id",
        ordo_proto::errors::reason::INVALID_MEMBER_ID,
        id,
        true,
    )
}

/// Checks a member id: up to 255 bytes, no control characters (empty: none).
pub fn validate_member_id(id: &str) -> Result<(), BrokerError> {
    validate_label(
        "member id",
        ordo_proto::errors::reason::INVALID_MEMBER_ID,
        id,
        true,
    )
}

/// Checks a topic name.
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    let reason = ordo_proto::errors::reason::INVALID_TOPIC_NAME;
    if name.is_empty() {
        return Err(BrokerError::invalid(reason, "topic name is empty"));
    }
    if name.len() > TOPIC_NAME_LEN_MAX {
        return Err(BrokerError::invalid(
            reason,
            format!(
                "topic name is {} characters; the limit is {TOPIC_NAME_LEN_MAX}",
                name.len()
            ),
        ));
    }
    if name == "." || name == ".." {
        return Err(BrokerError::invalid(
            reason,
            "topic name cannot be '.' or '..'",
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(BrokerError::invalid(
            reason,
            format!(
                "topic name {name:?} contains {bad:?}; use ASCII letters, digits, '.', '_' and '-'"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Good names pass; each kind of bad name is refused.
    #[test]
    fn topic_names() {
        for good in ["a", "orders", "orders.v1", "my_topic-2", &"x".repeat(249)] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "bad name", "sl/ash", "ünï", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
    }
}
