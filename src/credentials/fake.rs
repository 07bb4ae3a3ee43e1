//! The offline credential source behind `--fake-credentials`: well-formed temporary credentials
//! that no AWS service will accept, minted locally with a real expiry and no network calls.
//!
//! It exists so that the daemon, and every SDK talking to it, can be exercised on a laptop or in CI
//! without an AWS account. The values look like STS's (`ASIA` + 16 base-32 characters, a 40-character
//! secret, a long base64 session token), so client-side validation behaves as it would for real.

use std::time::Duration;

use base64::Engine as _;
use futures::FutureExt as _;
use futures::future::BoxFuture;

use super::{AssumeRequest, CredentialSource, Credentials, Secret, SourceError};
use crate::clock::{SharedClock, floor_to_second};

/// How long fake credentials last unless configured otherwise: what EC2 gives instance profiles.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug)]
pub struct FakeSource {
    lifetime: Duration,
    clock: SharedClock,
}

impl FakeSource {
    pub fn new(lifetime: Duration, clock: SharedClock) -> Self {
        Self { lifetime, clock }
    }
}

impl CredentialSource for FakeSource {
    fn assume<'a>(
        &'a self,
        request: &'a AssumeRequest,
    ) -> BoxFuture<'a, Result<Credentials, SourceError>> {
        let lifetime = request
            .duration_seconds
            .map_or(self.lifetime, |s| Duration::from_secs(u64::from(s)));
        let now = self.clock.now();
        let result = random_credentials().map(|(akid, secret, token)| Credentials {
            access_key_id: akid,
            secret_access_key: Secret::new(secret),
            session_token: Secret::new(token),
            expiration: floor_to_second(now + lifetime),
            assumed_role_arn: Some(format!(
                "arn:{}:sts::{}:assumed-role/{}/{}",
                request.role_arn.partition(),
                request.role_arn.account(),
                request.role_arn.name(),
                request.session_name
            )),
        });
        async move { result }.boxed()
    }

    fn default_duration(&self) -> Duration {
        self.lifetime
    }

    fn kind(&self) -> &'static str {
        "fake"
    }
}

/// `(access key id, secret access key, session token)` from the operating system's CSPRNG.
fn random_credentials() -> Result<(String, String, String), SourceError> {
    let mut bytes = [0u8; 16 + 30 + 700];
    getrandom::fill(&mut bytes).map_err(|e| {
        SourceError::Unavailable(format!("the system random generator failed: {e}"))
    })?;
    let (key, rest) = bytes.split_at(16);
    let (secret, token) = rest.split_at(30);

    // Access key ids use an upper-case base-32 alphabet.
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut akid = String::with_capacity(20);
    akid.push_str("ASIA");
    akid.extend(key.iter().map(|b| BASE32[usize::from(b & 31)] as char));

    // 30 random bytes are exactly 40 base64 characters, the length of a real secret key.
    let secret = base64::engine::general_purpose::STANDARD.encode(secret);

    // Real session tokens are base64 and start with this prefix; some tools sniff it.
    let mut session = String::from("IQoJb3JpZ2luX2Vj");
    session.push_str(&base64::engine::general_purpose::STANDARD.encode(token));
    Ok((akid, secret, session))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::clock::SystemClock;
    use crate::identity::role::RoleArn;

    #[tokio::test]
    async fn fake_credentials_look_like_sts_credentials() {
        let source = FakeSource::new(DEFAULT_LIFETIME, Arc::new(SystemClock));
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/app").expect("valid");
        let request = AssumeRequest::new(arn, "web");
        let a = source.assume(&request).await.expect("fake never fails");
        let b = source.assume(&request).await.expect("fake never fails");

        assert_eq!(a.access_key_id.len(), 20);
        assert!(a.access_key_id.starts_with("ASIA"));
        assert!(
            a.access_key_id
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        );
        assert_eq!(a.secret_access_key.expose().len(), 40);
        assert!(a.session_token.expose().len() > 900);
        assert_ne!(a.access_key_id, b.access_key_id);
        assert_eq!(
            a.assumed_role_arn.as_deref(),
            Some("arn:aws:sts::123456789012:assumed-role/app/web")
        );
        let left = a
            .expiration
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(left > Duration::from_secs(6 * 3600 - 5) && left <= DEFAULT_LIFETIME);
    }

    #[tokio::test]
    async fn requested_duration_wins() {
        let source = FakeSource::new(DEFAULT_LIFETIME, Arc::new(SystemClock));
        let mut request = AssumeRequest::new(
            RoleArn::parse("arn:aws:iam::123456789012:role/app").expect("valid"),
            "s1",
        );
        request.duration_seconds = Some(900);
        let c = source.assume(&request).await.expect("ok");
        let left = c
            .expiration
            .duration_since(SystemTime::now())
            .expect("future");
        assert!(left <= Duration::from_secs(900));
    }
}
