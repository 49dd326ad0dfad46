//! Validated names and positions: channels, users, epochs, offsets.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes, longer than {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} contains {ch:?}: only ASCII letters, digits and _ - : . @ / are allowed")]
    BadChar { what: &'static str, ch: char },
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '@' | '/')
}

fn validate(what: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { what });
    }
    if s.len() > max {
        return Err(NameError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    if let Some(ch) = s.chars().find(|c| !allowed(*c)) {
        return Err(NameError::BadChar { what, ch });
    }
    Ok(())
}

/// A channel name: 1–255 bytes of ASCII letters, digits and `_ - : . @ /`.
/// Cheap to clone (shared, immutable): a broker keeps a channel's name in
/// several tables (hub, broker, each session's subscriptions), one copy.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelName(std::sync::Arc<str>);

impl ChannelName {
    /// Longest channel name, in bytes.
    pub const MAX_LEN: usize = 255;
    /// Prefix of personal channels: `user:{id}`.
    pub const USER_PREFIX: &'static str = "user:";

    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        validate("channel name", &s, Self::MAX_LEN)?;
        Ok(Self(s.into()))
    }

    /// The personal channel of `user`.
    pub fn personal(user: &UserId) -> Self {
        Self(format!("{}{}", Self::USER_PREFIX, user.as_str()).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The user id when this is a personal channel `user:{id}`.
    pub fn personal_user(&self) -> Option<&str> {
        self.0
            .strip_prefix(Self::USER_PREFIX)
            .filter(|id| !id.is_empty())
    }
}

impl TryFrom<String> for ChannelName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl TryFrom<&str> for ChannelName {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl From<ChannelName> for String {
    fn from(c: ChannelName) -> String {
        c.0.to_string()
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A user id (JWT `sub`): channel-name characters, at most 250 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(Box<str>);

impl UserId {
    /// Longest user id, in bytes (so that `user:{id}` is a valid channel).
    pub const MAX_LEN: usize = 250;

    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        validate("user id", &s, Self::MAX_LEN)?;
        Ok(Self(s.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl From<UserId> for String {
    fn from(u: UserId) -> String {
        u.0.into()
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The opaque epoch of a channel's history: offsets compare only within one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(String);

impl Epoch {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The position of a publication in its channel: 1, 2, 3, … within an epoch.
/// Offset 0 means "nothing published yet".
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Offset(pub u64);

impl Offset {
    pub const ZERO: Offset = Offset(0);

    pub fn get(self) -> u64 {
        self.0
    }

    #[must_use]
    pub fn next(self) -> Offset {
        Offset(self.0.saturating_add(1))
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_the_contract() {
        assert!(ChannelName::new("news").is_ok());
        assert!(ChannelName::new("a_b-c:d.e@f/g").is_ok());
        assert!(ChannelName::new("x".repeat(255)).is_ok());
        assert_eq!(
            ChannelName::new("x".repeat(256)),
            Err(NameError::TooLong {
                what: "channel name",
                len: 256,
                max: 255
            })
        );
        assert_eq!(
            ChannelName::new(""),
            Err(NameError::Empty {
                what: "channel name"
            })
        );
        assert!(matches!(
            ChannelName::new("with space"),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert!(ChannelName::new("é").is_err());
    }

    #[test]
    fn personal_channels_name_their_user() {
        let c = ChannelName::new("user:42").expect("valid");
        assert_eq!(c.personal_user(), Some("42"));
        assert_eq!(
            ChannelName::new("user:").expect("valid").personal_user(),
            None
        );
        assert_eq!(
            ChannelName::new("news").expect("valid").personal_user(),
            None
        );
        let u = UserId::new("alice").expect("valid");
        assert_eq!(ChannelName::personal(&u).as_str(), "user:alice");
    }

    #[test]
    fn user_ids_are_at_most_250_bytes() {
        assert!(UserId::new("u".repeat(250)).is_ok());
        assert!(UserId::new("u".repeat(251)).is_err());
    }
}
