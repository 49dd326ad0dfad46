//! Close codes (PROTOCOL.md §8) and error codes (§4).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why the server closes a connection: a WebSocket close code or a QUIC
/// application close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 4000: normal close by the server (also: session taken over by a resume).
    Normal,
    /// 4001: malformed message, or a message before `connect`.
    ProtocolError,
    /// 4003: bad or missing token.
    Unauthorized,
    /// 4005: the client sent nothing for two heartbeats.
    HeartbeatTimeout,
    /// 4008: too much queued for a client that does not read.
    SlowConsumer,
    /// 4009: a client message over the size limit.
    TooLarge,
    /// 4010: the server is shutting down; resume on another node.
    ShuttingDown,
    /// 4011: the token expired.
    TokenExpired,
    /// 4029: the client sent more than its rate allows.
    RateLimited,
}

impl CloseCode {
    pub const ALL: [CloseCode; 9] = [
        CloseCode::Normal,
        CloseCode::ProtocolError,
        CloseCode::Unauthorized,
        CloseCode::HeartbeatTimeout,
        CloseCode::SlowConsumer,
        CloseCode::TooLarge,
        CloseCode::ShuttingDown,
        CloseCode::TokenExpired,
        CloseCode::RateLimited,
    ];

    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 4000,
            CloseCode::ProtocolError => 4001,
            CloseCode::Unauthorized => 4003,
            CloseCode::HeartbeatTimeout => 4005,
            CloseCode::SlowConsumer => 4008,
            CloseCode::TooLarge => 4009,
            CloseCode::ShuttingDown => 4010,
            CloseCode::TokenExpired => 4011,
            CloseCode::RateLimited => 4029,
        }
    }

    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Whether a client should reconnect after this close.
    pub fn reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::ProtocolError | CloseCode::Unauthorized | CloseCode::TooLarge
        )
    }

    /// A short, stable, human-readable reason.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal close",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::TooLarge => "message too large",
            CloseCode::ShuttingDown => "server shutting down",
            CloseCode::TokenExpired => "token expired",
            CloseCode::RateLimited => "rate limited",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.reason())
    }
}

/// The `code` of an `error` message, and of API error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The HTTP status the backend API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip_and_advise() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
        }
        assert_eq!(CloseCode::from_code(1000), None);
        assert!(!CloseCode::ProtocolError.reconnect());
        assert!(!CloseCode::Unauthorized.reconnect());
        assert!(!CloseCode::TooLarge.reconnect());
        assert!(CloseCode::SlowConsumer.reconnect());
        assert!(CloseCode::ShuttingDown.reconnect());
        assert!(CloseCode::TokenExpired.reconnect());
    }

    #[test]
    fn error_codes_serialize_snake_case() {
        let s = serde_json::to_string(&ErrorCode::RateLimited).expect("serializes");
        assert_eq!(s, "\"rate_limited\"");
        assert_eq!(ErrorCode::TooLarge.http_status(), 413);
    }
}
