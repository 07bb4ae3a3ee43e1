//! IMDSv2 session tokens: stateless, bound to the caller, and valid across restarts.
//!
//! A token is 40 bytes, sent as 56 characters of URL-safe base64 (like EC2's, ending in `==`):
//!
//! ```text
//! [0]      format version (1)
//! [1..5]   expiry, Unix seconds, big-endian
//! [5..20]  random nonce, so every token is distinct
//! [20..40] HMAC-SHA256(key, bytes[0..20] ‖ binding), truncated to 20 bytes
//! ```
//!
//! Nothing is stored per token, so any number can be live at once (botocore asks for a new one on
//! every credential fetch). The binding is the caller's workload identity, so a token is worthless
//! to anyone else. The key lives in the state directory, so a restart keeps every issued token
//! valid: the Rust SDK caches its token for up to six hours and does not drop it on a 401.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use crate::clock::unix_seconds;

/// The longest TTL a caller may ask for (six hours).
pub const MAX_TTL: u32 = 21_600;
/// Length of a token on the wire.
pub const TOKEN_LEN: usize = 56;

const VERSION: u8 = 1;
const RAW_LEN: usize = 40;
const SIGNED_LEN: usize = 20;

/// The secret that signs tokens.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

/// Why a presented token was refused. All of them are a 401 to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token was not issued to this caller, or not by this daemon")]
    BadSignature,
}

/// Issues and checks tokens.
#[derive(Clone)]
pub struct Tokens {
    /// HMAC-SHA256 with the key already absorbed: every request checks a token, and cloning this
    /// state saves hashing the key's two pads each time.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(<key redacted>)")
    }
}

impl Tokens {
    pub fn new(key: TokenKey) -> Self {
        // A 32-byte key is always a valid HMAC key.
        let keyed = <Hmac<Sha256>>::new_from_slice(key.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        Self { keyed }
    }

    /// A token for `binding`, valid `ttl` seconds from `now`.
    pub fn issue(
        &self,
        binding: &[u8],
        ttl: u32,
        now: SystemTime,
    ) -> Result<String, getrandom::Error> {
        // Rounded up, so a token lives at least its full TTL (a TTL of 1 is never 0.3 s).
        let until = now + Duration::from_secs(u64::from(ttl));
        let mut expires_secs = unix_seconds(until);
        if until > UNIX_EPOCH + Duration::from_secs(expires_secs) {
            expires_secs += 1;
        }
        let expires = u32::try_from(expires_secs).unwrap_or(u32::MAX);
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..5].copy_from_slice(&expires.to_be_bytes());
        getrandom::fill(&mut raw[5..SIGNED_LEN])?;
        let mac = self.mac(&raw[..SIGNED_LEN], binding);
        raw[SIGNED_LEN..].copy_from_slice(&mac[..RAW_LEN - SIGNED_LEN]);
        Ok(URL_SAFE.encode(raw))
    }

    /// Checks a presented token for `binding`; returns how long it has left.
    pub fn verify(
        &self,
        token: &[u8],
        binding: &[u8],
        now: SystemTime,
    ) -> Result<Duration, TokenError> {
        time_left(self.check(token, binding)?, now)
    }

    /// [`Tokens::verify`] for `binding`'s value, remembering in it the last token that checked
    /// out: SDKs send the same token for hours, and comparing it costs less than its HMAC.
    pub fn verify_with(
        &self,
        binding: &Binding,
        token: &[u8],
        now: SystemTime,
    ) -> Result<Duration, TokenError> {
        // What is remembered was checked against this very binding, so only the bytes and the
        // expiry are left to compare.
        if let Some(known) = binding.last.load().as_deref()
            && same_bytes(&known.token, token)
        {
            return time_left(known.expires, now);
        }
        let expires = self.check(token, binding.as_bytes())?;
        if let Ok(token) = <[u8; TOKEN_LEN]>::try_from(token) {
            binding
                .last
                .store(Some(Arc::new(Checked { token, expires })));
        }
        time_left(expires, now)
    }

    /// The expiry (Unix seconds) of a well-formed token signed for `binding`.
    fn check(&self, token: &[u8], binding: &[u8]) -> Result<u32, TokenError> {
        if token.len() != TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut raw = [0u8; RAW_LEN + 2];
        let n = URL_SAFE
            .decode_slice(token, &mut raw)
            .map_err(|_| TokenError::Malformed)?;
        if n != RAW_LEN || raw[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let expected = self.mac(&raw[..SIGNED_LEN], binding);
        if !bool::from(expected[..RAW_LEN - SIGNED_LEN].ct_eq(&raw[SIGNED_LEN..RAW_LEN])) {
            return Err(TokenError::BadSignature);
        }
        Ok(u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]))
    }

    fn mac(&self, signed: &[u8], binding: &[u8]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(signed);
        mac.update(binding);
        mac.finalize().into_bytes().into()
    }
}

/// Whether `known` and `presented` are equal, reading every byte (no early exit), without
/// `subtle`'s per-byte barrier: the memo this compares against holds a token the same caller
/// presented before, so there is nothing in it for a timing difference to reveal to anyone else.
fn same_bytes(known: &[u8; TOKEN_LEN], presented: &[u8]) -> bool {
    presented.len() == TOKEN_LEN
        && known
            .iter()
            .zip(presented)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Whole seconds from `now` to `expires` (Unix seconds), or `Expired`.
fn time_left(expires: u32, now: SystemTime) -> Result<Duration, TokenError> {
    let expires = UNIX_EPOCH + Duration::from_secs(u64::from(expires));
    match expires.duration_since(now) {
        Ok(left) if !left.is_zero() => Ok(Duration::from_secs(left.as_secs())),
        _ => Err(TokenError::Expired),
    }
}

/// What one workload's IMDSv2 tokens are bound to (a token is valid only for the workload it
/// was issued to), with the last token the workload presented that checked out, for
/// [`Tokens::verify_with`]. The token is never printed: it is as good as a password for the
/// workload.
pub struct Binding {
    value: Box<str>,
    last: ArcSwapOption<Checked>,
}

struct Checked {
    token: [u8; TOKEN_LEN],
    expires: u32,
}

impl Binding {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Binding {
            value: value.into(),
            last: ArcSwapOption::empty(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.value.as_bytes()
    }
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Binding")
            .field(&self.value)
            .field(&format_args!("<last token redacted>"))
            .finish()
    }
}

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` request header: digits only, 1 to 21600.
pub fn parse_ttl(value: &[u8]) -> Option<u32> {
    if value.is_empty() || value.len() > 5 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ttl: u32 = std::str::from_utf8(value).ok()?.parse().ok()?;
    (1..=MAX_TTL).contains(&ttl).then_some(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(TokenKey::from_bytes([7; 32]))
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn tokens_look_like_ec2_tokens() {
        let t = tokens().issue(b"ip:10.0.0.1", 21_600, t0()).expect("rng");
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(t.ends_with("=="));
        assert!(
            t[..54]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(
            t,
            tokens().issue(b"ip:10.0.0.1", 21_600, t0()).expect("rng")
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_header_and_binding_under_the_key() {
        let tk = tokens();
        for binding in [&b"ip:10.0.0.1"[..], b"", &[b'x'; 200]] {
            let t = tk.issue(binding, 60, t0()).expect("rng");
            let raw = URL_SAFE.decode(&t).expect("base64");
            let mut mac = <Hmac<Sha256>>::new_from_slice(&[7; 32]).expect("key");
            mac.update(&raw[..SIGNED_LEN]);
            mac.update(binding);
            let expected = mac.finalize().into_bytes();
            assert_eq!(raw[SIGNED_LEN..], expected[..RAW_LEN - SIGNED_LEN]);
            // Checking reuses the keyed state; it must not carry one check into the next.
            assert!(tk.verify(t.as_bytes(), binding, t0()).is_ok());
            assert!(tk.verify(t.as_bytes(), binding, t0()).is_ok());
        }
    }

    #[test]
    fn a_remembered_token_is_still_checked_for_expiry_caller_and_bytes() {
        let tk = tokens();
        let mine = Binding::new("ip:10.0.0.1");
        let t = tk.issue(mine.as_bytes(), 60, t0()).expect("rng");
        let left = |at: u64| tk.verify_with(&mine, t.as_bytes(), t0() + Duration::from_secs(at));
        assert_eq!(left(0), Ok(Duration::from_secs(60)));
        let shown = format!("{mine:?}");
        assert!(!shown.contains(&t), "{shown}");
        assert!(shown.contains("ip:10.0.0.1"), "{shown}");
        // Remembered now: the same answers as a full check.
        assert_eq!(left(10), Ok(Duration::from_secs(50)));
        assert_eq!(left(60), Err(TokenError::Expired));
        // Another caller presenting it is refused, also after it has a token of its own
        // remembered.
        let theirs = Binding::new("ip:10.0.0.2");
        assert_eq!(
            tk.verify_with(&theirs, t.as_bytes(), t0()),
            Err(TokenError::BadSignature)
        );
        let own = tk.issue(theirs.as_bytes(), 60, t0()).expect("rng");
        assert!(tk.verify_with(&theirs, own.as_bytes(), t0()).is_ok());
        assert_eq!(
            tk.verify_with(&theirs, t.as_bytes(), t0()),
            Err(TokenError::BadSignature)
        );
        // One changed character, a prefix, garbage.
        let mut tampered = t.clone().into_bytes();
        tampered[30] = if tampered[30] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            tk.verify_with(&mine, &tampered, t0()),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            tk.verify_with(&mine, &t.as_bytes()[..40], t0()),
            Err(TokenError::Malformed)
        );
        // A newer token replaces the remembered one; the older one is still valid.
        let newer = tk.issue(mine.as_bytes(), 120, t0()).expect("rng");
        assert_eq!(
            tk.verify_with(&mine, newer.as_bytes(), t0()),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(left(1), Ok(Duration::from_secs(59)));
    }

    #[test]
    fn a_token_is_valid_for_its_ttl_and_only_for_its_caller() {
        let tk = tokens();
        let t = tk.issue(b"ip:10.0.0.1", 60, t0()).expect("rng");
        assert_eq!(
            tk.verify(t.as_bytes(), b"ip:10.0.0.1", t0() + Duration::from_secs(1)),
            Ok(Duration::from_secs(59))
        );
        assert_eq!(
            tk.verify(t.as_bytes(), b"ip:10.0.0.2", t0()),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            tk.verify(t.as_bytes(), b"ip:10.0.0.1", t0() + Duration::from_secs(60)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_lives_at_least_its_ttl() {
        let tk = tokens();
        let issued = t0() + Duration::from_millis(999);
        let t = tk.issue(b"b", 1, issued).expect("rng");
        assert!(
            tk.verify(t.as_bytes(), b"b", issued + Duration::from_millis(990))
                .is_ok()
        );
        assert_eq!(
            tk.verify(t.as_bytes(), b"b", issued + Duration::from_millis(1001)),
            Err(TokenError::Expired)
        );
        let t = tk.issue(b"b", 21_600, issued).expect("rng");
        let left = tk.verify(t.as_bytes(), b"b", issued).expect("valid");
        assert!(left <= Duration::from_secs(21_600), "{left:?}");
    }

    #[test]
    fn another_key_or_a_tampered_token_is_refused() {
        let t = tokens().issue(b"b", 60, t0()).expect("rng");
        let other = Tokens::new(TokenKey::from_bytes([8; 32]));
        assert_eq!(
            other.verify(t.as_bytes(), b"b", t0()),
            Err(TokenError::BadSignature)
        );

        // Extending the expiry invalidates the signature.
        let mut raw = URL_SAFE.decode(&t).expect("b64");
        raw[4] ^= 0xff;
        let forged = URL_SAFE.encode(raw);
        assert_eq!(
            tokens().verify(forged.as_bytes(), b"b", t0()),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let tk = tokens();
        for junk in [&b""[..], b"bogus", &[b'A'; 56], &[0xff; 56]] {
            assert!(tk.verify(junk, b"b", t0()).is_err());
        }
    }

    #[test]
    fn ttl_header_accepts_exactly_1_to_21600() {
        assert_eq!(parse_ttl(b"1"), Some(1));
        assert_eq!(parse_ttl(b"21600"), Some(21600));
        for bad in [
            &b""[..],
            b"0",
            b"21601",
            b"abc",
            b"-5",
            b" 5",
            b"5 ",
            b"+5",
            b"1e3",
            b"999999",
            // A header sent twice and joined by a proxy or client library: a bad TTL, not the first.
            b"21600, 21600",
            b"21600,21600",
            b"60,",
        ] {
            assert_eq!(parse_ttl(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
