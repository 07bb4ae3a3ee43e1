//! Role credentials: what is asked for ([`AssumeRequest`], the cache key), what comes back
//! ([`Credentials`]), where it comes from ([`CredentialSource`]: STS, or the offline fake), and the
//! [`broker::Broker`] that caches, shares and refreshes it, calling the source no faster than the
//! [`limiter::Limiter`] allows.
//!
//! Secrets never leave this module in a form that prints: [`Secret`] redacts itself in `Debug` and
//! `Display`, and the only way to read one is [`Secret::expose`].

pub mod broker;
pub mod fake;
pub mod limiter;
pub mod observed;
pub mod sts;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use thiserror::Error;

use crate::identity::role::RoleArn;

/// Every input of one `sts:AssumeRole` call. Two callers share credentials only when every field is
/// equal: a cache keyed by the ARN alone leaks one caller's external id or session to another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssumeRequest {
    pub role_arn: RoleArn,
    pub session_name: String,
    pub external_id: Option<String>,
    /// `DurationSeconds`; `None` lets the source choose (3600 s for STS).
    pub duration_seconds: Option<u32>,
    /// An inline session policy (JSON).
    pub policy: Option<String>,
    pub policy_arns: Vec<String>,
    pub source_identity: Option<String>,
    /// Session tags, in the order given.
    pub tags: Vec<(String, String)>,
    pub transitive_tag_keys: Vec<String>,
}

impl AssumeRequest {
    /// A request with only the role and session name set.
    pub fn new(role_arn: RoleArn, session_name: impl Into<String>) -> Self {
        Self {
            role_arn,
            session_name: session_name.into(),
            external_id: None,
            duration_seconds: None,
            policy: None,
            policy_arns: Vec::new(),
            source_identity: None,
            tags: Vec::new(),
            transitive_tag_keys: Vec::new(),
        }
    }
}

/// A string that must never be logged: a secret access key or a session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(s: impl Into<Arc<str>>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that must send it to the caller.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Temporary credentials for one role session.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    /// When the credentials stop working, exactly as the source said.
    pub expiration: SystemTime,
    /// The assumed-role ARN STS reported (`arn:aws:sts::…:assumed-role/name/session`), if any.
    pub assumed_role_arn: Option<String>,
}

impl Credentials {
    /// The access key id with all but the last four characters hidden, for logs.
    pub fn key_hint(&self) -> String {
        let n = self.access_key_id.len();
        let tail = &self.access_key_id[n.saturating_sub(4)..];
        format!("…{tail}")
    }
}

impl Credentials {
    /// Why these credentials cannot be handed to anyone, if they cannot: a field is empty, or
    /// they have expired by `now`. A source that answers "success" with such credentials (an
    /// SDK fills missing fields of a truncated answer with empty strings and the Unix epoch)
    /// has failed; serving them would give callers a `Code: Success` document that works nowhere.
    pub fn unusable(&self, now: SystemTime) -> Option<String> {
        let mut missing = Vec::new();
        if self.access_key_id.is_empty() {
            missing.push("access key id");
        }
        if self.secret_access_key.expose().is_empty() {
            missing.push("secret access key");
        }
        if self.session_token.expose().is_empty() {
            missing.push("session token");
        }
        if !missing.is_empty() {
            return Some(format!("no {}", missing.join(", no ")));
        }
        (self.expiration <= now).then(|| {
            format!(
                "they expired at {}",
                crate::clock::format_iso8601(self.expiration)
            )
        })
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.key_hint())
            .field("expiration", &crate::clock::format_iso8601(self.expiration))
            .field("assumed_role_arn", &self.assumed_role_arn)
            .finish_non_exhaustive()
    }
}

/// Why a source could not produce credentials. The broker and the HTTP layer branch on the kind:
/// a permanent refusal is shown to the caller the way EC2 shows it (HTTP 200 with a `Code`), a
/// transient failure as a 5xx that SDKs retry.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SourceError {
    /// STS refused, and asking again will not help (AccessDenied, no such role, bad external id,
    /// malformed policy). `code` is EC2's or STS's error code.
    #[error("{code}: {message}")]
    Denied { code: String, message: String },
    /// STS could not be reached or failed (throttling, 5xx, timeout); worth retrying.
    #[error("{0}")]
    Unavailable(String),
}

impl SourceError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, SourceError::Denied { .. })
    }
}

/// Where role credentials come from.
pub trait CredentialSource: Send + Sync + fmt::Debug {
    /// Performs one AssumeRole call. Implementations do not cache; the broker does.
    fn assume<'a>(
        &'a self,
        request: &'a AssumeRequest,
    ) -> BoxFuture<'a, Result<Credentials, SourceError>>;

    /// The longest session this source can grant when the request does not say, so the broker can
    /// tell whether the refresh threshold can be met at all.
    fn default_duration(&self) -> Duration;

    /// A short name for logs and metrics: `sts` or `fake`.
    fn kind(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_with_an_empty_field_or_past_their_expiry_are_unusable() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let good = Credentials {
            access_key_id: "ASIAEXAMPLEKEY123456".into(),
            secret_access_key: Secret::new("secret"),
            session_token: Secret::new("token"),
            expiration: now + Duration::from_secs(3600),
            assumed_role_arn: None,
        };
        assert_eq!(good.unusable(now), None);
        let empty = Credentials {
            access_key_id: String::new(),
            session_token: Secret::new(""),
            ..good.clone()
        };
        assert_eq!(
            empty.unusable(now).as_deref(),
            Some("no access key id, no session token")
        );
        let expired = Credentials {
            expiration: SystemTime::UNIX_EPOCH,
            ..good
        };
        assert_eq!(
            expired.unusable(now).as_deref(),
            Some("they expired at 1970-01-01T00:00:00Z")
        );
    }

    #[test]
    fn debug_output_never_contains_secrets() {
        let creds = Credentials {
            access_key_id: "ASIAEXAMPLEKEY123456".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            session_token: Secret::new("IQoJb3JpZ2luX2VjEXAMPLETOKEN"),
            expiration: SystemTime::UNIX_EPOCH,
            assumed_role_arn: None,
        };
        let shown = format!(
            "{creds:?} {} {:?}",
            creds.secret_access_key, creds.session_token
        );
        assert!(!shown.contains("wJalr"), "{shown}");
        assert!(!shown.contains("IQoJ"), "{shown}");
        assert!(!shown.contains("ASIAEXAMPLE"), "{shown}");
        assert!(shown.contains("…3456"), "{shown}");
    }
}
