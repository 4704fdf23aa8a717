//! Validated names: [`ServiceName`], [`TenantId`] and the pair [`InstanceId`].
//!
//! Every id that reaches a path, an argv, an environment variable or a log field went through
//! [`validate_label`] first: constructors and serde decoding both validate, so a value of these
//! types is always a DNS label (`[a-z0-9-]`, 1-63 characters, no leading or trailing `-`).
//! Nothing here touches the file system.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest DNS label (RFC 1035, 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a string is not a valid label or instance id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} is longer than 63 characters")]
    TooLong { what: &'static str, value: String },
    #[error("{what} {value:?} may only contain a-z, 0-9 and '-'")]
    BadCharacter { what: &'static str, value: String },
    #[error("{what} {value:?} may not start or end with '-'")]
    EdgeHyphen { what: &'static str, value: String },
    #[error("instance {value:?} must be written SERVICE:ID, like notes:alice")]
    NotAnInstance { value: String },
}

/// Checks that `value` is a DNS label as tenement uses them: lower-case ASCII letters, digits
/// and `-`, 1 to 63 characters, not starting or ending with `-`.
pub fn validate_label(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    // Report the length before the characters only for plain ASCII input, so a long string of
    // garbage is still described by its worst problem.
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(IdError::BadCharacter {
            what,
            value: shorten(value),
        });
    }
    if value.len() > MAX_LABEL_LEN {
        return Err(IdError::TooLong {
            what,
            value: shorten(value),
        });
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(IdError::EdgeHyphen {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Keeps error messages one short line even when the input was huge.
fn shorten(value: &str) -> String {
    const KEEP: usize = 80;
    if value.len() <= KEEP {
        return value.to_owned();
    }
    let mut end = KEEP;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate_label($what, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let value = String::deserialize(d)?;
                Self::new(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_type!(
    /// A service name such as `notes`: the middle label of `alice.notes.example.com`.
    ServiceName,
    "service name"
);
label_type!(
    /// A tenant id such as `alice`: the first label of `alice.notes.example.com`.
    TenantId,
    "instance id"
);

/// One instance: a service and a tenant, written `notes:alice`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId {
    pub service: ServiceName,
    pub id: TenantId,
}

impl InstanceId {
    pub fn new(service: ServiceName, id: TenantId) -> Self {
        Self { service, id }
    }

    /// Parses `SERVICE:ID`.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let Some((service, id)) = value.split_once(':') else {
            return Err(IdError::NotAnInstance {
                value: shorten(value),
            });
        };
        Ok(Self {
            service: ServiceName::new(service)?,
            id: TenantId::new(id)?,
        })
    }
}

impl FromStr for InstanceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.id)
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl Serialize for InstanceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InstanceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        Self::parse(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_accept_dns_labels() {
        for ok in ["a", "alice", "bob-2", "0", &"a".repeat(63), "x-y-z"] {
            assert!(validate_label("id", ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn labels_refuse_everything_that_could_reach_a_path_or_argv() {
        let cases: &[&str] = &[
            "",
            "../x",
            "..",
            ".",
            "a.b",
            "A",
            "Alice",
            "a b",
            "a/b",
            "/tmp/victim",
            "{port}",
            "{id}",
            "-a",
            "a-",
            "a\0b",
            "a\nb",
            "é",
            "a_b",
            "a:b",
            "%2e%2e",
            "$(id)",
            "`id`",
            "a;b",
        ];
        for bad in cases {
            assert!(
                validate_label("id", bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert_eq!(
            validate_label("instance id", &"a".repeat(64)),
            Err(IdError::TooLong {
                what: "instance id",
                value: "a".repeat(64)
            })
        );
    }

    #[test]
    fn instance_ids_round_trip_through_display_and_serde() {
        let id = InstanceId::parse("notes:alice").expect("valid");
        assert_eq!(id.to_string(), "notes:alice");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"notes:alice\"");
        let back: InstanceId = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
    }

    #[test]
    fn instance_ids_are_validated_when_decoded() {
        for bad in [
            "\"notes\"",
            "\"notes:../x\"",
            "\"notes:a b\"",
            "\":alice\"",
            "\"notes:\"",
        ] {
            assert!(
                serde_json::from_str::<InstanceId>(bad).is_err(),
                "{bad} should not decode"
            );
        }
        assert!(serde_json::from_str::<TenantId>("\"a.b\"").is_err());
    }

    #[test]
    fn errors_are_one_short_line() {
        let err = InstanceId::parse(&"x".repeat(10_000)).expect_err("no colon");
        let text = err.to_string();
        assert!(text.len() < 200, "{text}");
        assert!(!text.contains('\n'));
    }
}
