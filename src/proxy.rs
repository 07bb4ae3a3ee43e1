//! Proxy mode: the real instance metadata service behind imdsd (`--upstream`).
//!
//! This module owns everything about talking to the upstream: the daemon's *own* IMDSv2 session
//! (fetched once, shared by every caller, renewed before it expires, re-fetched when the upstream
//! answers 401, dropped in favour of IMDSv1 when the upstream has no token endpoint), forwarding one
//! GET or HEAD with bounded time and body size, and the policy of what a container may read of the
//! host's metadata ([`Upstream::allows`]: an optional deny-by-default allow-list with named presets,
//! and hiding `user-data`).
//!
//! Nothing of the caller's request reaches the upstream but its method and its path and query: no
//! caller token (the caller's tokens are imdsd's own, worthless upstream), no `X-Forwarded-For`
//! (EC2 refuses token-bearing requests that carry it), no other header. The upstream's answer comes
//! back as status, body bytes and content type, unchanged; the HTTP layer adds its own headers.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use wildmatch::WildMatch;

use crate::imds::path::{self, MetadataPath, VERSIONS};
use crate::imds::token::{MAX_TTL, parse_ttl};

/// Where the real metadata service answers on EC2.
pub const DEFAULT_UPSTREAM: &str = "http://169.254.169.254";

/// The largest upstream body accepted. The biggest real values (user data, 16 KiB on EC2; the
/// PKCS#7 signature) are far below it; anything larger is not a metadata service.
pub const MAX_BODY: usize = 1024 * 1024;

/// How long an upstream without a token endpoint is served with IMDSv1 before asking again.
const V1_RETRY: Duration = Duration::from_secs(300);

/// The session is renewed once this share of its TTL has passed (80%), so a caller never waits on
/// a token that is about to expire.
const RENEW_NUMERATOR: u32 = 4;
const RENEW_DENOMINATOR: u32 = 5;

/// The longest token accepted from the upstream (EC2's are 56 characters).
const MAX_TOKEN_LEN: usize = 1024;

const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token");
const TOKEN_TTL_HEADER: HeaderName =
    HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");

/// How the proxy talks to the upstream, and what callers may read through it.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// `http://host[:port]`, e.g. [`DEFAULT_UPSTREAM`] or `http://127.0.0.1:8169`.
    pub upstream: String,
    /// `None`: forward every path. `Some`: deny by default and forward only paths matching one of
    /// these patterns (`@preset` names are expanded, see [`PRESETS`]).
    pub allow: Option<Vec<String>>,
    /// Never forward `user-data`, whatever the allow-list says.
    pub hide_user_data: bool,
    /// How long one forward may take as a whole (connect, token fetch, request, body, the one
    /// retry after a 401). SDKs give the metadata service about one second per attempt.
    pub timeout: Duration,
    /// TTL the daemon asks for its own upstream session (capped at six hours); renewed at 80%.
    pub token_ttl: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            upstream: DEFAULT_UPSTREAM.to_string(),
            allow: None,
            hide_user_data: false,
            timeout: Duration::from_secs(2),
            token_ttl: Duration::from_secs(u64::from(MAX_TTL)),
        }
    }
}

/// What the upstream answered, for the HTTP layer to send on.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The whole body, also for HEAD: the upstream is asked with GET so that the HTTP layer can
    /// send the `Content-Length` a GET would have (hyper drops the body of a HEAD answer).
    pub body: Bytes,
}

/// Why nothing could be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No usable answer: connection refused or reset, a malformed or oversized answer, a token
    /// endpoint that fails. Callers see 502.
    #[error("the upstream metadata service is unreachable: {0}")]
    Unreachable(String),
    /// No answer within [`ProxyOptions::timeout`]. Callers see 504.
    #[error("the upstream metadata service did not answer in time")]
    Timeout,
}

/// Named allow-list presets, used as `@name` in an allow-list. Each is the minimum its consumer
/// reads; entries are exact paths unless a glob is needed.
pub const PRESETS: &[(&str, &[&str])] = &[
    (
        // aws-node-termination-handler in IMDS mode (pkg/ec2metadata, v1.x): what it polls for
        // interruptions, and what it reads once at startup to describe the node in its events and
        // webhooks. It asks for IMDSv2 and falls back to IMDSv1 on its own.
        "node-termination-handler",
        &[
            // Spot interruption notice (404 when none: NTH treats that as "no event").
            "/latest/meta-data/spot/instance-action",
            // Scheduled maintenance events (JSON list).
            "/latest/meta-data/events/maintenance/scheduled",
            // Rebalance recommendation (404 when none).
            "/latest/meta-data/events/recommendations/rebalance",
            // ASG lifecycle hook target state (e.g. "Terminated" on scale-in).
            "/latest/meta-data/autoscaling/target-lifecycle-state",
            // Node description at startup: the identity document first (account, region, ...),
            // then the single values below (also its fallback when the document is unreadable).
            "/latest/dynamic/instance-identity/document",
            "/latest/meta-data/instance-id",
            "/latest/meta-data/instance-type",
            "/latest/meta-data/instance-life-cycle",
            "/latest/meta-data/local-hostname",
            "/latest/meta-data/local-ipv4",
            "/latest/meta-data/public-hostname",
            "/latest/meta-data/public-ipv4",
            "/latest/meta-data/placement/availability-zone",
        ],
    ),
    (
        // What the AWS SDKs read to find their region when none is configured.
        "sdk-region",
        &[
            // Rust and JavaScript (defaults mode "auto").
            "/latest/meta-data/placement/region",
            // botocore / the AWS CLI (the zone minus its last letter).
            "/latest/meta-data/placement/availability-zone",
            // Go v2 (`imds.GetRegion`) and Java read the identity document's "region".
            "/latest/dynamic/instance-identity/document",
        ],
    ),
];

/// Expands `@preset` names and validates every pattern; returns the patterns in their normal
/// form (version prefix written `/latest`, no trailing slash), without duplicates.
///
/// A pattern is a path starting with `/` and `latest` or a dated version (both mean the same), with
/// `*` matching any run of characters, `/` included. Errors name the bad entry.
pub fn expand_allow_list(entries: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |p: String| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for entry in entries {
        if let Some(name) = entry.strip_prefix('@') {
            let Some((_, paths)) = PRESETS.iter().find(|(n, _)| *n == name) else {
                let known: Vec<String> = PRESETS.iter().map(|(n, _)| format!("@{n}")).collect();
                return Err(format!(
                    "unknown allow-list preset {entry:?}; known presets: {}",
                    known.join(", ")
                ));
            };
            for p in *paths {
                push(normalise_pattern(p)?);
            }
        } else {
            push(normalise_pattern(entry)?);
        }
    }
    Ok(out)
}

/// Checks one pattern and writes it in normal form.
fn normalise_pattern(pattern: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("bad allow-list pattern {pattern:?}: {why}"));
    if !pattern.starts_with('/') {
        return bad(
            "a pattern is a path and starts with '/', e.g. \"/latest/meta-data/instance-id\"",
        );
    }
    if pattern.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("it contains whitespace or a control character");
    }
    if pattern.contains('?') {
        return bad("patterns match the path only, and '*' is the only wildcard ('?' is not one)");
    }
    if pattern.contains('%') {
        return bad("paths are matched decoded; write the character instead of its %-escape");
    }
    let segments: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return bad("it contains a '.' or '..' segment");
    }
    let Some((first, rest)) = segments.split_first() else {
        // "/": the version listing.
        return Ok("/".to_string());
    };
    let first = if *first == "latest" || VERSIONS.contains(first) {
        "latest"
    } else if first.contains('*') {
        first
    } else {
        return bad(
            "it must start with /latest/ (or a dated version such as /2021-03-23/, which means the \
             same)",
        );
    };
    let mut normal = format!("/{first}");
    for s in rest {
        normal.push('/');
        normal.push_str(s);
    }
    if owned_by_imdsd(&normal) {
        return bad(
            "imdsd answers the token endpoint and meta-data/iam itself; they are never forwarded",
        );
    }
    Ok(normal)
}

/// One allow-list pattern.
#[derive(Debug)]
struct Pattern {
    glob: WildMatch,
    /// Whether the pattern names the instance identity credentials explicitly (see
    /// [`Upstream::allows`]).
    names_identity_credentials: bool,
}

/// The request path in the form patterns are written in: percent-decoded, empty segments removed,
/// the version segment (`latest`, a date, or anything else) written `latest`, no trailing slash.
/// `None` for paths imdsd refuses outright (dot segments, control characters, bad UTF-8).
///
/// Every first segment counts as `latest`, known version or not, so that no spelling of a version
/// gets around `hide_user_data`; an upstream answers unknown versions with 404 anyway.
fn normalise_path(raw: &str) -> Option<String> {
    let rest = match path::parse(raw).ok()? {
        MetadataPath::Root => return Some("/".to_string()),
        MetadataPath::Versioned { rest, .. } | MetadataPath::UnknownVersion { rest } => rest,
    };
    Some(if rest.is_empty() {
        "/latest".to_string()
    } else {
        format!("/latest/{rest}")
    })
}

/// Whether `normal` is under `prefix` (itself or a descendant).
fn under(normal: &str, prefix: &str) -> bool {
    normal
        .strip_prefix(prefix)
        .is_some_and(|tail| tail.is_empty() || tail.starts_with('/'))
}

/// Paths imdsd serves itself in proxy mode: the token endpoint and the role credentials.
fn owned_by_imdsd(normal: &str) -> bool {
    normal == "/latest/api/token" || under(normal, "/latest/meta-data/iam")
}

/// The host's instance identity credentials (`arn:…:assumed-role/aws:ec2-instance/<id>`).
fn is_identity_credentials(normal: &str) -> bool {
    under(normal, "/latest/meta-data/identity-credentials")
}

/// The daemon's session with the upstream.
enum Session {
    /// None yet, or dropped after a 401.
    Empty,
    /// A token, used until `renew_at`, and until `expires_at` while a renewal fails.
    Token {
        value: HeaderValue,
        renew_at: Instant,
        expires_at: Instant,
    },
    /// The upstream has no token endpoint (IMDSv1 only): forward without a token until `retry_at`.
    V1Only { retry_at: Instant },
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential for the host's metadata: never printed.
        match self {
            Session::Empty => f.write_str("Empty"),
            Session::Token {
                renew_at,
                expires_at,
                ..
            } => f
                .debug_struct("Token")
                .field("value", &"<redacted>")
                .field("renew_at", renew_at)
                .field("expires_at", expires_at)
                .finish(),
            Session::V1Only { retry_at } => f
                .debug_struct("V1Only")
                .field("retry_at", retry_at)
                .finish(),
        }
    }
}

/// The upstream metadata service. Cheap to clone; clones share the session and the connection pool.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    scheme: Scheme,
    authority: Authority,
    client: Client<HttpConnector, Empty<Bytes>>,
    allow: Option<Vec<Pattern>>,
    hide_user_data: bool,
    timeout: Duration,
    /// The TTL asked for, in seconds (1 to 21600).
    token_ttl: u32,
    user_agent: HeaderValue,
    /// Read and written in short critical sections, never across an await.
    session: Mutex<Session>,
    /// Held while a token is fetched, so that concurrent callers share one PUT.
    refresh: tokio::sync::Mutex<()>,
    token_fetches: AtomicU64,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let mut d = f.debug_struct("Upstream");
        d.field("upstream", &format_args!("{}://{}", i.scheme, i.authority))
            .field(
                "allow",
                &i.allow
                    .as_ref()
                    .map(|p| p.iter().map(|p| p.glob.to_string()).collect::<Vec<_>>()),
            )
            .field("hide_user_data", &i.hide_user_data)
            .field("timeout", &i.timeout)
            .field("token_ttl", &i.token_ttl);
        if let Ok(session) = i.session.try_lock() {
            d.field("session", &*session);
        }
        d.field("token_fetches", &i.token_fetches.load(Ordering::Relaxed))
            .finish()
    }
}

impl Upstream {
    /// Validates the options: the URL must be `http://host[:port]` (IMDS has no TLS; the path must
    /// be empty), and every allow-list entry a valid pattern or preset.
    pub fn new(options: ProxyOptions) -> Result<Upstream, String> {
        let (scheme, authority) = parse_upstream(&options.upstream)?;
        let allow = match &options.allow {
            None => None,
            Some(entries) => Some(
                expand_allow_list(entries)?
                    .into_iter()
                    .map(|p| Pattern {
                        names_identity_credentials: p.contains("identity-credentials"),
                        glob: WildMatch::new(&p),
                    })
                    .collect(),
            ),
        };
        if options.timeout.is_zero() {
            return Err("the upstream timeout must be longer than zero".into());
        }
        let token_ttl = u32::try_from(options.token_ttl.as_secs())
            .unwrap_or(MAX_TTL)
            .clamp(1, MAX_TTL);

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A link-local connect takes well under a millisecond; one that hangs means nothing is
        // there (a black-holed address), which is reported as such (502) before the whole
        // forward's `timeout` runs out (504).
        connector.set_connect_timeout(Some((options.timeout / 2).min(Duration::from_secs(1))));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            // EC2 closes every connection; keep-alive only matters for upstreams that keep them.
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .http1_max_buf_size(64 * 1024)
            .build(connector);
        let user_agent = HeaderValue::from_static(concat!("imdsd/", env!("CARGO_PKG_VERSION")));

        Ok(Upstream {
            inner: Arc::new(Inner {
                scheme,
                authority,
                client,
                allow,
                hide_user_data: options.hide_user_data,
                timeout: options.timeout,
                token_ttl,
                user_agent,
                session: Mutex::new(Session::Empty),
                refresh: tokio::sync::Mutex::new(()),
                token_fetches: AtomicU64::new(0),
            }),
        })
    }

    /// Whether a caller may read `path` (the request path as received, e.g.
    /// `/latest/meta-data/instance-id` or `/2021-01-03/user-data`) through the proxy.
    ///
    /// The path is normalised first (percent-decoded, any version segment read as `latest`,
    /// empty segments and the trailing slash dropped); a path imdsd would refuse with 400 is not
    /// allowed. Then, in order:
    /// - paths imdsd serves itself (`api/token`, `meta-data/iam/…`) are never forwarded: false;
    /// - with `hide_user_data`, `user-data` (any case) is false;
    /// - the host's instance identity credentials (`meta-data/identity-credentials/…`) are
    ///   forwarded only when an allow-list pattern that names `identity-credentials` matches:
    ///   they are credentials of the host, which "forward everything" should not hand out;
    /// - without an allow-list everything else is true; with one, a path must match a pattern.
    pub fn allows(&self, path: &str) -> bool {
        let Some(normal) = normalise_path(path) else {
            return false;
        };
        if owned_by_imdsd(&normal) {
            return false;
        }
        if self.inner.hide_user_data && under(&normal.to_ascii_lowercase(), "/latest/user-data") {
            return false;
        }
        let identity = is_identity_credentials(&normal);
        match &self.inner.allow {
            None => !identity,
            Some(patterns) => patterns
                .iter()
                .any(|p| p.glob.matches(&normal) && (!identity || p.names_identity_credentials)),
        }
    }

    /// Forwards one GET or HEAD (`path_and_query` as received) to the upstream with the daemon's
    /// own session. HEAD is asked as GET (see [`Forwarded::body`]); other methods are refused.
    ///
    /// A 401 from the upstream means the daemon's token is no longer valid (the upstream restarted,
    /// or the token expired early): the token is dropped, a new one fetched, and the request sent
    /// once more. A second 401 is an error, not passed on: the caller's own token is fine, and an
    /// SDK that saw 401 would throw it away.
    pub async fn forward(
        &self,
        method: &Method,
        path_and_query: &str,
    ) -> Result<Forwarded, UpstreamError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(UpstreamError::Unreachable(format!(
                "imdsd forwards only GET and HEAD, not {method}"
            )));
        }
        let pq = PathAndQuery::try_from(path_and_query)
            .ok()
            .filter(|pq| pq.as_str().starts_with('/'))
            .ok_or_else(|| UpstreamError::Unreachable("the request path is not valid".into()))?;
        let uri = self.uri(pq)?;
        match tokio::time::timeout(self.inner.timeout, self.forward_with_retry(&uri)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    /// Number of token PUTs sent to the upstream so far, successful or not.
    pub fn token_fetches(&self) -> u64 {
        self.inner.token_fetches.load(Ordering::Relaxed)
    }

    async fn forward_with_retry(&self, uri: &Uri) -> Result<Forwarded, UpstreamError> {
        let token = self.session().await?;
        let first = self.get(uri, token.as_ref()).await?;
        if first.status != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        tracing::info!(
            path = uri.path(),
            with_token = token.is_some(),
            "the upstream refused imdsd's session (401); getting a new one"
        );
        self.invalidate(token.as_ref());
        let token = self.session().await?;
        let second = self.get(uri, token.as_ref()).await?;
        if second.status == StatusCode::UNAUTHORIZED {
            tracing::warn!(
                path = uri.path(),
                "the upstream refused a fresh session token (401)"
            );
            return Err(UpstreamError::Unreachable(
                "the upstream refused imdsd's own session token (401)".into(),
            ));
        }
        Ok(second)
    }

    /// The token to send, fetching one when there is none or it is due for renewal. `None`: the
    /// upstream has no token endpoint, use IMDSv1.
    async fn session(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        // Single flight: whoever gets the lock first fetches; the others find its token.
        let _refreshing = self.inner.refresh.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        match self.fetch_token().await {
            Ok(token) => Ok(token),
            // A renewal that fails early (the upstream answered, but not with a token) leaves
            // the old token in use for the rest of its life; the next forward tries again.
            Err(e) => match self.unexpired() {
                Some(token) => {
                    tracing::warn!(error = %e, "cannot renew the upstream session; using the current one");
                    Ok(Some(token))
                }
                None => Err(e),
            },
        }
    }

    /// The cached token if it has not expired, due for renewal or not.
    fn unexpired(&self) -> Option<HeaderValue> {
        match &*self.lock_session() {
            Session::Token {
                value, expires_at, ..
            } if Instant::now() < *expires_at => Some(value.clone()),
            _ => None,
        }
    }

    /// The cached session if it is still good: `Some(Some(token))`, `Some(None)` for IMDSv1, or
    /// `None` when a token must be fetched.
    fn current(&self) -> Option<Option<HeaderValue>> {
        let now = Instant::now();
        let session = self.lock_session();
        match &*session {
            Session::Token {
                value, renew_at, ..
            } if now < *renew_at => Some(Some(value.clone())),
            Session::V1Only { retry_at } if now < *retry_at => Some(None),
            _ => None,
        }
    }

    /// Forgets the session that was refused, unless another caller already replaced it.
    fn invalidate(&self, sent: Option<&HeaderValue>) {
        let mut session = self.lock_session();
        let stale = match (&*session, sent) {
            (Session::Token { value, .. }, Some(sent)) => value == sent,
            (Session::Token { .. }, None) => false,
            // A 401 without a token: the upstream wants tokens now.
            (Session::V1Only { .. }, None) => true,
            _ => false,
        };
        if stale {
            *session = Session::Empty;
        }
    }

    fn lock_session(&self) -> std::sync::MutexGuard<'_, Session> {
        // The critical sections cannot panic, but a poisoned lock still holds a valid session.
        self.inner
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `PUT /latest/api/token`; stores and returns the result. Called with the refresh lock held.
    async fn fetch_token(&self) -> Result<Option<HeaderValue>, UpstreamError> {
        let i = &self.inner;
        let uri = self.uri(PathAndQuery::from_static("/latest/api/token"))?;
        let request = Request::builder()
            .method(Method::PUT)
            .uri(uri)
            .header(header::USER_AGENT, i.user_agent.clone())
            .header(TOKEN_TTL_HEADER, HeaderValue::from(i.token_ttl))
            .body(Empty::new())
            .map_err(|e| {
                UpstreamError::Unreachable(format!("cannot build the token request: {e}"))
            })?;
        i.token_fetches.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = self.send(request).await?;
        let status = parts.status;
        match status {
            StatusCode::OK => {}
            // No token endpoint (an IMDSv1-only upstream, or one that refuses PUT): EC2's SDKs
            // fall back to IMDSv1 on these, and so does the proxy, asking again later.
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                tracing::warn!(
                    status = status.as_u16(),
                    retry_in = ?V1_RETRY,
                    "the upstream refused an IMDSv2 token; forwarding with IMDSv1 for now"
                );
                *self.lock_session() = Session::V1Only {
                    retry_at: Instant::now() + V1_RETRY,
                };
                return Ok(None);
            }
            other => {
                return Err(UpstreamError::Unreachable(format!(
                    "the upstream answered the token request with {other}"
                )));
            }
        }
        let value = (!body.is_empty() && body.len() <= MAX_TOKEN_LEN)
            .then(|| HeaderValue::from_maybe_shared(body).ok())
            .flatten()
            .filter(|v| v.as_bytes().iter().all(|b| b.is_ascii_graphic()));
        let Some(mut value) = value else {
            return Err(UpstreamError::Unreachable(
                "the upstream sent an unusable IMDSv2 token".into(),
            ));
        };
        value.set_sensitive(true);
        // The TTL the upstream granted, when it says so (EC2 does); else the one asked for.
        let ttl = parts
            .headers
            .get(TOKEN_TTL_HEADER)
            .and_then(|v| parse_ttl(v.as_bytes()))
            .unwrap_or(i.token_ttl);
        let lifetime = Duration::from_secs(u64::from(ttl));
        let now = Instant::now();
        tracing::debug!(ttl, "obtained an IMDSv2 session from the upstream");
        *self.lock_session() = Session::Token {
            value: value.clone(),
            renew_at: now + lifetime * RENEW_NUMERATOR / RENEW_DENOMINATOR,
            // A little early, for the time the token took to reach us.
            expires_at: now + lifetime - (lifetime / 10).min(Duration::from_secs(1)),
        };
        Ok(Some(value))
    }

    /// One GET, with the token if there is one and nothing else of the caller's.
    async fn get(
        &self,
        uri: &Uri,
        token: Option<&HeaderValue>,
    ) -> Result<Forwarded, UpstreamError> {
        let mut builder = Request::builder()
            .method(Method::GET)
            .uri(uri.clone())
            .header(header::USER_AGENT, self.inner.user_agent.clone());
        if let Some(token) = token {
            builder = builder.header(TOKEN_HEADER, token.clone());
        }
        let request = builder
            .body(Empty::new())
            .map_err(|e| UpstreamError::Unreachable(format!("cannot build the request: {e}")))?;
        let (parts, body) = self.send(request).await?;
        Ok(Forwarded {
            status: parts.status,
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            body,
        })
    }

    /// Sends a request and reads its whole body (bounded by [`MAX_BODY`]).
    async fn send(
        &self,
        request: Request<Empty<Bytes>>,
    ) -> Result<(http::response::Parts, Bytes), UpstreamError> {
        let response = self
            .inner
            .client
            .request(request)
            .await
            .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        let (parts, body) = response.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(too_large());
        }
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    UpstreamError::Unreachable(format!("reading the answer failed: {e}"))
                }
            })?
            .to_bytes();
        Ok((parts, body))
    }

    fn uri(&self, pq: PathAndQuery) -> Result<Uri, UpstreamError> {
        Uri::builder()
            .scheme(self.inner.scheme.clone())
            .authority(self.inner.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| UpstreamError::Unreachable(format!("cannot build the upstream URL: {e}")))
    }
}

fn too_large() -> UpstreamError {
    UpstreamError::Unreachable(format!(
        "the upstream answer is too large (over {MAX_BODY} bytes)"
    ))
}

/// An error and its causes on one line ("client error (Connect): tcp connect error: Connection
/// refused"), since hyper's outer message says little.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `http://host[:port]` with an optional final `/`; nothing else.
fn parse_upstream(url: &str) -> Result<(Scheme, Authority), String> {
    let bad = |why: &str| Err(format!("bad upstream URL {url:?}: {why}"));
    let uri: Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return bad(&e.to_string()),
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return bad("only http:// is supported (the metadata service has no TLS)"),
        None => return bad("it must start with http://, e.g. http://169.254.169.254"),
    }
    let Some(authority) = uri.authority().cloned() else {
        return bad("it has no host");
    };
    if authority.as_str().contains('@') {
        return bad("it must not carry user information");
    }
    if authority.host().is_empty() {
        return bad("it has no host");
    }
    if let Some(pq) = uri.path_and_query()
        && (pq.path() != "/" || pq.query().is_some())
    {
        return bad("it must be the service root, without a path (imdsd forwards /latest/...)");
    }
    Ok((Scheme::HTTP, authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(allow: Option<&[&str]>, hide_user_data: bool) -> Upstream {
        Upstream::new(ProxyOptions {
            allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            hide_user_data,
            ..ProxyOptions::default()
        })
        .expect("valid options")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn paths_are_normalised_like_the_router_reads_them() {
        assert_eq!(normalise_path("/").as_deref(), Some("/"));
        assert_eq!(normalise_path("/latest/").as_deref(), Some("/latest"));
        assert_eq!(
            normalise_path("/2021-01-03/user-data").as_deref(),
            Some("/latest/user-data")
        );
        assert_eq!(
            normalise_path("//latest//meta-data/placement/availability-zone/").as_deref(),
            Some("/latest/meta-data/placement/availability-zone")
        );
        assert_eq!(
            normalise_path("/latest/user%2Ddata").as_deref(),
            Some("/latest/user-data")
        );
        assert_eq!(
            normalise_path("/2099-12-31/user-data").as_deref(),
            Some("/latest/user-data")
        );
        assert_eq!(normalise_path("/latest/meta-data/../user-data"), None);
        assert_eq!(normalise_path("/latest/%ff"), None);
    }

    #[test]
    fn without_an_allow_list_everything_but_owned_paths_and_host_credentials_is_forwarded() {
        let u = upstream(None, false);
        for ok in [
            "/",
            "/latest",
            "/latest/meta-data/",
            "/latest/meta-data/instance-id",
            "/2009-04-04/user-data",
            "/latest/dynamic/instance-identity/document",
        ] {
            assert!(u.allows(ok), "{ok}");
        }
        for no in [
            "/latest/api/token",
            "/latest/meta-data/iam",
            "/latest/meta-data/iam/",
            "/2021-01-03/meta-data/iam/security-credentials/host-role",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/../meta-data/iam",
        ] {
            assert!(!u.allows(no), "{no}");
        }
        // Lookalikes of owned paths are not owned.
        assert!(u.allows("/latest/meta-data/iamx"));
    }

    #[test]
    fn hiding_user_data_covers_every_spelling() {
        let u = upstream(None, true);
        for no in [
            "/latest/user-data",
            "/latest/user-data/",
            "/2021-01-03/user-data",
            "/1.0/user-data",
            "/2099-01-01/user-data",
            "//latest//user-data",
            "/latest/user%2ddata",
            "/latest/User-Data",
        ] {
            assert!(!u.allows(no), "{no}");
        }
        assert!(u.allows("/latest/meta-data/instance-id"));
        assert!(u.allows("/latest/user-data-x"));
        // Hiding wins over an allow-list that names it.
        let u = upstream(Some(&["/latest/user-data", "/latest/*"]), true);
        assert!(!u.allows("/latest/user-data"));
        assert!(u.allows("/latest/meta-data/instance-id"));
    }

    #[test]
    fn an_allow_list_denies_by_default() {
        let u = upstream(
            Some(&["@node-termination-handler", "/latest/meta-data/placement/*"]),
            false,
        );
        for ok in [
            "/latest/meta-data/spot/instance-action",
            "/2021-07-15/meta-data/spot/instance-action",
            "/latest/meta-data/instance-id/",
            "/latest/meta-data/events/maintenance/scheduled",
            "/latest/meta-data/autoscaling/target-lifecycle-state",
            "/latest/dynamic/instance-identity/document",
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone/",
        ] {
            assert!(u.allows(ok), "{ok}");
        }
        for no in [
            "/",
            "/latest",
            "/latest/meta-data",
            "/latest/user-data",
            "/latest/meta-data/spot",
            "/latest/meta-data/instance-idx",
            "/latest/meta-data/placement",
            "/latest/meta-data/mac",
            "/latest/meta-data/iam/security-credentials/",
        ] {
            assert!(!u.allows(no), "{no}");
        }
    }

    #[test]
    fn identity_credentials_need_a_pattern_that_names_them() {
        let path = "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance";
        assert!(!upstream(Some(&["/*"]), false).allows(path));
        assert!(!upstream(Some(&["/latest/meta-data/*"]), false).allows(path));
        assert!(upstream(Some(&["/latest/meta-data/identity-credentials/*"]), false).allows(path));
    }

    #[test]
    fn patterns_are_normalised_and_presets_expanded() {
        let out = expand_allow_list(&strings(&[
            "/2021-03-23/meta-data/instance-id/",
            "/latest//meta-data/instance-id",
            "/",
            "/*/user-data",
            "@sdk-region",
        ]))
        .expect("valid");
        assert_eq!(
            out,
            [
                "/latest/meta-data/instance-id",
                "/",
                "/*/user-data",
                "/latest/meta-data/placement/region",
                "/latest/meta-data/placement/availability-zone",
                "/latest/dynamic/instance-identity/document",
            ]
        );
        // Normal forms are fixed points, so a list expanded once (by the configuration) and again
        // (by `Upstream::new`) stays the same.
        assert_eq!(
            expand_allow_list(&out).expect("normal forms are valid"),
            out
        );
        for (name, paths) in PRESETS {
            let expanded = expand_allow_list(&[format!("@{name}")]).expect("presets are valid");
            assert_eq!(expanded.len(), paths.len(), "{name}");
        }
    }

    #[test]
    fn bad_patterns_are_rejected_by_name() {
        for bad in [
            "latest/meta-data",
            "",
            "/meta-data/instance-id",
            "/latest/meta data",
            "/latest/meta-data/instance-id?x=1",
            "/latest/user%2Ddata",
            "/latest/../user-data",
            "/latest/meta-data/iam/*",
            "/latest/meta-data/iam",
            "/2021-01-03/api/token",
            "@no-such-preset",
        ] {
            let err = expand_allow_list(&strings(&["/latest/ok", bad])).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn upstream_urls_are_http_roots() {
        for ok in [
            "http://169.254.169.254",
            "http://169.254.169.254/",
            "http://127.0.0.1:8169",
            "http://[fd00:ec2::254]",
            "http://imds.internal:80",
        ] {
            assert!(parse_upstream(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://169.254.169.254/latest",
            "http://169.254.169.254/?x=1",
            "http://user@169.254.169.254",
            "http://",
            "",
        ] {
            let err = parse_upstream(bad).expect_err(bad);
            assert!(err.contains("bad upstream URL"), "{err}");
        }
        let err = Upstream::new(ProxyOptions {
            timeout: Duration::ZERO,
            ..ProxyOptions::default()
        })
        .expect_err("zero timeout");
        assert!(err.contains("timeout"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let u = upstream(Some(&["/latest/*"]), true);
        *u.lock_session() = Session::Token {
            value: HeaderValue::from_static("SECRET-TOKEN-VALUE"),
            renew_at: Instant::now(),
            expires_at: Instant::now(),
        };
        let shown = format!("{u:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("/latest/*"), "{shown}");
    }

    /// Answers every PUT with 500 and every GET with 200 and the token it was sent.
    async fn failing_token_endpoint() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                let answer = if head.starts_with("put ") {
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".to_string()
                } else {
                    let token = head
                        .lines()
                        .find_map(|l| l.strip_prefix("x-aws-ec2-metadata-token: "))
                        .unwrap_or("none")
                        .trim()
                        .to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{token}",
                        token.len()
                    )
                };
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_failed_renewal_keeps_the_unexpired_token_and_a_failed_fetch_is_an_error() {
        let addr = failing_token_endpoint().await;
        let u = Upstream::new(ProxyOptions {
            upstream: format!("http://{addr}"),
            ..ProxyOptions::default()
        })
        .expect("valid");
        let path = "/latest/meta-data/instance-id";

        // No token at all: the failed PUT is the answer.
        let err = u.forward(&Method::GET, path).await.expect_err("no token");
        assert!(
            matches!(&err, UpstreamError::Unreachable(m) if m.contains("500")),
            "{err:?}"
        );

        // Due for renewal but not expired: still used.
        let now = Instant::now();
        *u.lock_session() = Session::Token {
            value: HeaderValue::from_static("old-token"),
            renew_at: now,
            expires_at: now + Duration::from_secs(60),
        };
        let got = u.forward(&Method::GET, path).await.expect("old token used");
        assert_eq!(got.body.as_ref(), b"old-token");

        // Expired: not used.
        *u.lock_session() = Session::Token {
            value: HeaderValue::from_static("old-token"),
            renew_at: now,
            expires_at: now,
        };
        assert!(u.forward(&Method::GET, path).await.is_err());
        assert_eq!(u.token_fetches(), 3);
    }

    #[tokio::test]
    async fn only_get_and_head_are_forwarded() {
        let u = upstream(None, false);
        let err = u
            .forward(&Method::POST, "/latest/meta-data")
            .await
            .expect_err("POST");
        assert!(matches!(err, UpstreamError::Unreachable(_)), "{err:?}");
        let err = u
            .forward(&Method::GET, "no-slash")
            .await
            .expect_err("bad path");
        assert!(matches!(err, UpstreamError::Unreachable(_)), "{err:?}");
        assert_eq!(u.token_fetches(), 0);
    }
}
