//! The instance metadata service as callers see it: routing, IMDSv2 tokens, and every response in
//! the bytes EC2 sends (see `reference/imds-protocol.md` in the shared notes).
//!
//! [`Imds::handle`] is the whole request path. It takes a request and the caller's address and
//! never fails: every outcome, including bad input, is a response. It makes no Docker or STS call
//! when the caller is known and its credentials are cached. Its first check is the Host rule
//! ([`crate::host`]): a request whose `Host` a rebinding web page could have sent gets 403.

pub mod path;
pub mod response;
pub mod token;
pub mod tree;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::clock::{SharedClock, format_iso8601};
use crate::credentials::broker::{Broker, Document, FetchError, Lookup, Served};
use crate::credentials::{AssumeRequest, SourceError};
use crate::host::{AllowedHosts, HostHeaders, Refused as HostRefused};
use crate::identity::{Assignment, ConnectionCaller, Identity, Refusal, RoleState, Workload};
use crate::logging::{ACCESS_TARGET, AccessLine, RepeatFilter, RepeatLimits};
use crate::metrics::{Metrics, REFUSED_HOST, Route};
use crate::proxy::{Upstream, UpstreamError};
use path::{MetadataPath, PathError};
use response::{
    ALLOW_METADATA, ALLOW_TOKEN, Body, ContentType, Responder, TOKEN_HEADER, TOKEN_TTL_HEADER,
};
use token::Tokens;
use tree::{Node, Tree};

/// `HttpTokens`: whether IMDSv1 (no token) is still served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpTokens {
    #[default]
    Optional,
    Required,
}

/// How the service behaves, beyond what it serves.
#[derive(Debug, Clone)]
pub struct ImdsOptions {
    pub http_tokens: HttpTokens,
    /// `HttpEndpoint`: when false, every request gets 403 as on an instance with IMDS turned off.
    pub endpoint_enabled: bool,
    /// Refuse token PUTs, and token-bearing GETs, that carry `X-Forwarded-For` (EC2 does).
    pub reject_forwarded: bool,
    /// Answer a token PUT carrying `Expect: 100-continue` with 417, as EC2 does.
    pub strict_expect: bool,
    /// Which identical access lines are written (see [`crate::logging::RepeatFilter`]); shared
    /// with the other listeners, since they write to the same log.
    pub access_log_limits: Arc<RepeatLimits>,
    pub connection: response::Connection,
    /// The names accepted as `Host` besides addresses (`--allowed-host`); shared with the other
    /// listeners, which apply the same rule.
    pub allowed_hosts: AllowedHosts,
}

impl Default for ImdsOptions {
    fn default() -> Self {
        Self {
            http_tokens: HttpTokens::Optional,
            endpoint_enabled: true,
            reject_forwarded: true,
            strict_expect: false,
            access_log_limits: Arc::default(),
            connection: response::Connection::Close,
            allowed_hosts: AllowedHosts::default(),
        }
    }
}

/// The metadata service. Shared by every connection.
#[derive(Debug)]
pub struct Imds {
    tree: Tree,
    tokens: Tokens,
    identity: Arc<Identity>,
    broker: Broker,
    responder: Responder,
    options: ImdsOptions,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    /// Proxy mode: where paths imdsd does not own are forwarded.
    upstream: Option<Arc<Upstream>>,
    /// Whether access lines are written at all, asked of the logger once: its filter is set at
    /// start and never changes, and asking per request is a dispatcher lookup each time.
    access_log: bool,
    /// Which access lines of refused requests are written when the caller is not known without
    /// waiting (refusals do not wait for it).
    refusals: RepeatFilter,
}

/// The request headers the metadata path reads, found in one pass over them: a request carries
/// a handful, and comparing names is cheaper than hashing each name looked up.
#[derive(Debug, Default, Clone, Copy)]
struct Seen<'a> {
    host: HostHeaders<'a>,
    token: Option<&'a HeaderValue>,
    forwarded: bool,
    agent: Option<&'a HeaderValue>,
    /// Set when the Host rule refused the request.
    refused_host: Option<HostRefused<'a>>,
}

impl<'a> Seen<'a> {
    fn scan(headers: &'a http::HeaderMap) -> Self {
        let mut seen = Seen::default();
        for (name, value) in headers {
            // The first value of each, as `HeaderMap::get` would give; every `Host`, since two
            // are refused.
            if *name == header::HOST {
                seen.host.saw(value);
            } else if *name == TOKEN_HEADER {
                seen.token.get_or_insert(value);
            } else if *name == header::USER_AGENT {
                seen.agent.get_or_insert(value);
            } else if *name == FORWARDED_FOR {
                seen.forwarded = true;
            }
        }
        seen
    }
}

/// The answer to one request, as hyper awaits it: at hand (a cached request: no state machine,
/// and nothing larger than the response to move), or the rest of the work, boxed.
pub enum Handled {
    Ready(std::future::Ready<Response<Body>>),
    Later(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

impl Future for Handled {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        match self.get_mut() {
            Handled::Ready(response) => Pin::new(response).poll(cx),
            Handled::Later(rest) => rest.as_mut().poll(cx),
        }
    }
}

/// The work left to finish a request once the caller is known.
type Wait = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// An outcome now, or one to wait for (credentials being fetched, or the upstream in proxy
/// mode). The waits own what they use, so a request that needs one hands it on whole.
enum Step {
    Ready(Outcome),
    Wait(Wait),
}

impl From<Outcome> for Step {
    fn from(outcome: Outcome) -> Self {
        Step::Ready(outcome)
    }
}

impl From<Response<Body>> for Step {
    fn from(response: Response<Body>) -> Self {
        Step::Ready(response.into())
    }
}

/// What the handler decided, for the request log.
struct Outcome {
    response: Response<Body>,
    /// Who asked, once known.
    workload: Option<Arc<Workload>>,
}

impl From<Response<Body>> for Outcome {
    fn from(response: Response<Body>) -> Self {
        Outcome {
            response,
            workload: None,
        }
    }
}

/// A request answered before its caller is looked up: refused, or `OPTIONS`.
#[derive(Debug, Clone)]
enum Early {
    Error(StatusCode),
    /// The methods the path allows, for `OPTIONS`.
    Options(HeaderValue),
    /// 405, with the methods the path allows.
    NotAllowed(HeaderValue),
}

/// What a request asks for, once the checks that need no caller have passed.
#[derive(Debug, Clone, Copy)]
enum Wanted {
    /// A new IMDSv2 token with this TTL.
    Token(u32),
    /// A metadata read (GET or HEAD).
    Metadata,
}

const IAM_PREFIX: &str = "meta-data/iam";
const FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");

impl Imds {
    pub fn new(
        tree: Tree,
        tokens: Tokens,
        identity: Arc<Identity>,
        broker: Broker,
        options: ImdsOptions,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        let responder = Responder::new(options.connection, clock.now());
        Self {
            tree,
            tokens,
            identity,
            broker,
            responder,
            options,
            clock,
            metrics,
            upstream: None,
            access_log: tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
            refusals: RepeatFilter::default(),
        }
    }

    /// Proxy mode: forward every path imdsd does not own to `upstream`.
    pub fn with_upstream(mut self, upstream: Arc<Upstream>) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// Answers one request from `caller`. A known caller's request is answered before this
    /// returns when nothing has to be waited for (cached credentials); only the rest builds a
    /// future.
    pub fn handle<B: Send + 'static>(
        self: Arc<Self>,
        request: Request<B>,
        caller: IpAddr,
        connection: &ConnectionCaller,
    ) -> Handled {
        let started = std::time::Instant::now();
        let path = path::parse(request.uri().path());
        let mut seen = Seen::scan(request.headers());
        if let Err(refused) = self.options.allowed_hosts.check(&seen.host, request.uri()) {
            seen.refused_host = Some(refused);
            // The caller, when known without waiting, names the line and keeps its repeats down.
            // (Not through the connection's memo: its one call below stays inlined.)
            let outcome = Outcome {
                response: self.responder.error(refused.status()),
                workload: self.identity.resolve_now(caller),
            };
            let response = self.finish(&request, &seen, &path, caller, started, outcome);
            return Handled::Ready(std::future::ready(response));
        }
        let wanted = match self.check(&request, &seen, &path) {
            Ok(wanted) => wanted,
            Err(early) => {
                let r = &self.responder;
                let response = match early {
                    Early::Error(status) => r.error(status),
                    Early::Options(allow) => r.options(allow),
                    Early::NotAllowed(allow) => r.method_not_allowed(allow),
                };
                let response =
                    self.finish(&request, &seen, &path, caller, started, response.into());
                return Handled::Ready(std::future::ready(response));
            }
        };
        let Some(workload) = self.identity.resolve_now_on(caller, connection) else {
            // A caller the Docker index does not know yet: wait for it, then as below.
            return Handled::Later(Box::pin(async move {
                let workload = self.identity.resolve(caller).await;
                let path = path::parse(request.uri().path());
                let seen = Seen::scan(request.headers());
                let outcome = match self.route(&request, &seen, &path, wanted, workload) {
                    Step::Ready(outcome) => outcome,
                    Step::Wait(rest) => rest.await,
                };
                self.finish(&request, &seen, &path, caller, started, outcome)
            }));
        };
        match self.route(&request, &seen, &path, wanted, workload) {
            Step::Ready(outcome) => {
                let response = self.finish(&request, &seen, &path, caller, started, outcome);
                Handled::Ready(std::future::ready(response))
            }
            Step::Wait(rest) => Handled::Later(Box::pin(async move {
                let outcome = rest.await;
                let path = path::parse(request.uri().path());
                let seen = Seen::scan(request.headers());
                self.finish(&request, &seen, &path, caller, started, outcome)
            })),
        }
    }

    /// Records a request's outcome (metrics, the access line) and returns its response.
    fn finish<B>(
        &self,
        request: &Request<B>,
        seen: &Seen<'_>,
        path: &Result<MetadataPath<'_>, PathError>,
        caller: IpAddr,
        started: std::time::Instant,
        outcome: Outcome,
    ) -> Response<Body> {
        let status = outcome.response.status();
        let elapsed = started.elapsed();
        self.metrics
            .request(route_of(path), status.as_u16(), elapsed);
        if seen.refused_host.is_some() {
            self.metrics
                .request_refused(crate::metrics::LISTENER_METADATA, REFUSED_HOST);
        } else if let Some(w) = &outcome.workload
            && matches!(w.role, RoleState::Unserved(_))
        {
            self.metrics.request_refused(
                crate::metrics::LISTENER_METADATA,
                crate::metrics::REFUSED_NETWORK,
            );
        }
        if self.access_log {
            let workload = outcome.workload.as_deref();
            let line = AccessLine {
                method: request.method(),
                path: request.uri().path(),
                status,
                agent: seen.agent.and_then(|v| v.to_str().ok()).unwrap_or("-"),
            };
            let filter = match workload {
                Some(w) => Some(&w.access_log),
                None => seen.refused_host.map(|_| &self.refusals),
            };
            if let Some(suppressed) = line.admit(filter, &self.options.access_log_limits, started) {
                let container = workload.and_then(|w| w.container.as_deref());
                let (role, refused) = match workload.map(|w| &w.role) {
                    _ if seen.refused_host.is_some() => (None, Some(REFUSED_HOST)),
                    Some(RoleState::Assigned(a)) => (Some(a.request().role_arn.as_str()), None),
                    Some(RoleState::Refused(r)) => (None, Some(r.code)),
                    Some(RoleState::Unserved(_)) => (None, Some("NetworkNotServed")),
                    _ => (None, None),
                };
                let host = seen.refused_host.map(|r| r.shown());
                tracing::info!(
                    target: ACCESS_TARGET,
                    method = %line.method,
                    path = line.path,
                    caller = %caller,
                    container = container.map(|c| c.name.as_str()),
                    container_id = container.map(|c| c.short_id()),
                    role,
                    refused,
                    host = host.as_deref(),
                    status = status.as_u16(),
                    micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                    agent = line.agent,
                    suppressed,
                );
            }
        }
        outcome.response
    }

    /// The checks that need no caller: the service turned off, a bad path, a method the path
    /// does not take, a bad token request. What the request wants, or the refusal.
    fn check<B>(
        &self,
        req: &Request<B>,
        seen: &Seen<'_>,
        path: &Result<MetadataPath<'_>, PathError>,
    ) -> Result<Wanted, Early> {
        if !self.options.endpoint_enabled {
            return Err(Early::Error(StatusCode::FORBIDDEN));
        }
        let Ok(path) = path else {
            return Err(Early::Error(StatusCode::BAD_REQUEST));
        };
        let token_path = match path {
            MetadataPath::Versioned { latest, rest } if rest == "api/token" => Some(*latest),
            // A PUT under any other prefix is refused like a versioned one, never 405: SDKs read
            // 405 on the token PUT as "IMDSv2 unsupported" and fall back to IMDSv1.
            MetadataPath::UnknownVersion { rest } if rest == "api/token" => Some(false),
            _ => None,
        };
        if let Some(latest) = token_path {
            return match *req.method() {
                Method::PUT if latest => self.check_token_request(req, seen).map(Wanted::Token),
                // EC2 refuses versioned token paths outright, and says this is intended.
                Method::PUT => Err(Early::Error(StatusCode::FORBIDDEN)),
                Method::OPTIONS => Err(Early::Options(ALLOW_TOKEN)),
                _ => Err(Early::NotAllowed(ALLOW_TOKEN)),
            };
        }
        match *req.method() {
            Method::GET | Method::HEAD => Ok(Wanted::Metadata),
            Method::OPTIONS => Err(Early::Options(ALLOW_METADATA)),
            _ => Err(Early::NotAllowed(ALLOW_METADATA)),
        }
    }

    /// A token PUT's TTL, or its refusal.
    fn check_token_request<B>(&self, req: &Request<B>, seen: &Seen<'_>) -> Result<u32, Early> {
        let headers = req.headers();
        if self.options.reject_forwarded && seen.forwarded {
            return Err(Early::Error(StatusCode::FORBIDDEN));
        }
        if self.options.strict_expect && headers.contains_key(header::EXPECT) {
            return Err(Early::Error(StatusCode::EXPECTATION_FAILED));
        }
        // Exactly one TTL: two header lines (or one comma-joined list, which `parse_ttl` refuses)
        // leave it open which one was meant.
        let mut ttls = headers.get_all(TOKEN_TTL_HEADER).iter();
        match (ttls.next(), ttls.next()) {
            (Some(ttl), None) => token::parse_ttl(ttl.as_bytes()),
            _ => None,
        }
        .ok_or(Early::Error(StatusCode::BAD_REQUEST))
    }

    /// What `workload` gets for a request that passed [`Imds::check`].
    fn route<B>(
        self: &Arc<Self>,
        req: &Request<B>,
        seen: &Seen<'_>,
        path: &Result<MetadataPath<'_>, PathError>,
        wanted: Wanted,
        workload: Arc<Workload>,
    ) -> Step {
        let r = &self.responder;
        // Until the index has synced, the caller cannot be told apart: a token issued now would
        // be bound to nobody it could ever be presented by, and one presented now cannot be
        // checked against anybody. 503, as for the role routes: SDKs retry it, and get a token
        // bound to their container once it is known.
        if matches!(workload.role, RoleState::Pending)
            && (matches!(wanted, Wanted::Token(_)) || seen.token.is_some())
        {
            tracing::warn!(caller = %workload.ip, "answering 503: the container index has not synced with the Docker Engine yet");
            return Outcome {
                response: r.error(StatusCode::SERVICE_UNAVAILABLE),
                workload: Some(workload),
            }
            .into();
        }
        if let Wanted::Token(ttl) = wanted {
            // A caller in a container network that no known container holds (its container
            // started a moment ago and the engine has not confirmed it within the wait): a token
            // now would be bound to no container, and SDKs keep a token for hours, so the
            // container would be refused with it long after it is known. 503: SDKs retry.
            if workload.unplaced() {
                tracing::info!(caller = %workload.ip, "answering 503 to a token request: no known container has this address yet");
                return Outcome {
                    response: r.error(StatusCode::SERVICE_UNAVAILABLE),
                    workload: Some(workload),
                }
                .into();
            }
            return Outcome {
                response: self.issue_token(&workload, ttl),
                workload: Some(workload),
            }
            .into();
        }
        let Ok(path) = path else {
            // `check` let only good paths through.
            return r.error(StatusCode::BAD_REQUEST).into();
        };
        // Refusals carry the caller too: the access line then names the container, and a caller
        // repeating a refused request (an expired token in a loop) is kept to a few lines.
        let refuse = |status| Outcome {
            response: r.error(status),
            workload: Some(workload.clone()),
        };
        // One reading of the clock for the token's expiry and the credentials' freshness.
        let now = self.broker.now();
        let token_ttl = match seen.token {
            Some(token) => {
                if self.options.reject_forwarded && seen.forwarded {
                    return refuse(StatusCode::FORBIDDEN).into();
                }
                match self
                    .tokens
                    .verify_with(&workload.binding, token.as_bytes(), now)
                {
                    Ok(left) => Some(left.as_secs()),
                    Err(e) => {
                        self.metrics.token_rejected();
                        tracing::debug!(caller = %workload.ip, reason = %e, "refused an IMDSv2 token");
                        return refuse(StatusCode::UNAUTHORIZED).into();
                    }
                }
            }
            None if self.options.http_tokens == HttpTokens::Required => {
                return refuse(StatusCode::UNAUTHORIZED).into();
            }
            None => None,
        };
        // EC2 tells a caller with a token how long it has left.
        let with_ttl = move |mut outcome: Outcome| {
            if let Some(left) = token_ttl {
                outcome
                    .response
                    .headers_mut()
                    .insert(TOKEN_TTL_HEADER, HeaderValue::from(left));
            }
            outcome
        };
        let forward = Forward {
            method: req.method(),
            path_and_query: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path(), |pq| pq.as_str()),
        };
        match self.serve(path, &workload, &forward, now) {
            Step::Ready(mut outcome) => {
                outcome.workload = Some(workload);
                with_ttl(outcome).into()
            }
            Step::Wait(rest) => Step::Wait(Box::pin(async move {
                let mut outcome = rest.await;
                outcome.workload = Some(workload);
                with_ttl(outcome)
            })),
        }
    }

    fn issue_token(&self, workload: &Workload, ttl: u32) -> Response<Body> {
        let r = &self.responder;
        match self.tokens.issue(
            workload.binding.as_bytes(),
            ttl,
            std::time::SystemTime::now(),
        ) {
            Ok(token) => {
                self.metrics.token_issued();
                r.token(Bytes::from(token), ttl)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot issue an IMDSv2 token: the system random generator failed");
                r.error(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// The answer to a metadata read, now when everything it needs is at hand (a cached request
    /// never suspends), else the work left to await: a credential fetch, or the upstream in
    /// proxy mode.
    fn serve(
        self: &Arc<Self>,
        path: &MetadataPath<'_>,
        workload: &Workload,
        request: &Forward<'_>,
        now: SystemTime,
    ) -> Step {
        let r = &self.responder;
        let rest = match path {
            MetadataPath::Root if self.upstream.is_some() => "",
            MetadataPath::Root => {
                return r
                    .ok(self.tree.root_listing(), ContentType::Text, None)
                    .into();
            }
            MetadataPath::UnknownVersion { .. } if self.upstream.is_some() => "",
            MetadataPath::UnknownVersion { .. } => return r.error(StatusCode::NOT_FOUND).into(),
            MetadataPath::Versioned { rest, .. } => rest.as_ref(),
        };
        let with_iam =
            workload.role.listed_name().is_some() || matches!(workload.role, RoleState::Pending);
        if let Some(upstream) = &self.upstream
            && !(rest.starts_with(IAM_PREFIX)
                && (rest.len() == IAM_PREFIX.len() || rest[IAM_PREFIX.len()..].starts_with('/')))
        {
            let (this, upstream) = (self.clone(), upstream.clone());
            let versioned = matches!(path, MetadataPath::Versioned { .. });
            let rest = rest.to_owned();
            let (method, path_and_query) =
                (request.method.clone(), request.path_and_query.to_owned());
            return Step::Wait(Box::pin(async move {
                let request = Forward {
                    method: &method,
                    path_and_query: &path_and_query,
                };
                this.serve_upstream(&upstream, versioned, &rest, with_iam, &request)
                    .await
                    .into()
            }));
        }
        if rest == "meta-data" {
            return r
                .ok(
                    self.tree.meta_data_listing(with_iam),
                    ContentType::Text,
                    None,
                )
                .into();
        }
        if let Some(sub) = rest.strip_prefix(IAM_PREFIX)
            && (sub.is_empty() || sub.starts_with('/'))
        {
            return self.serve_iam(sub.trim_start_matches('/'), workload, now);
        }
        match self.tree.get(rest) {
            Some(Node::Dir(listing)) => r.ok(listing.clone(), ContentType::Text, None).into(),
            Some(Node::Leaf(body, content_type)) => r.ok(body.clone(), *content_type, None).into(),
            None => r.error(StatusCode::NOT_FOUND).into(),
        }
    }

    /// Proxy mode: a path imdsd does not own, from the upstream; listings adjusted to the caller.
    async fn serve_upstream(
        &self,
        upstream: &Upstream,
        versioned: bool,
        rest: &str,
        with_iam: bool,
        request: &Forward<'_>,
    ) -> Response<Body> {
        let r = &self.responder;
        let mut response = self.forward(upstream, request).await;
        let listing_base = match rest {
            "meta-data" => Some("/latest/meta-data/"),
            "" if versioned => Some("/latest/"),
            _ => None,
        };
        if let Some(base) = listing_base
            && response.status() == StatusCode::OK
        {
            // The host's listing, with `iam/` only for callers that have a role of their own
            // and without what the caller may not read.
            let iam = (rest == "meta-data").then_some(with_iam);
            response = adjust_listing(r, response, iam, |entry| {
                let probe = match (base, entry.strip_suffix('/')) {
                    // The version's own listing: `dynamic`, `meta-data`, `user-data`.
                    ("/latest/", _) if entry != "user-data" => return true,
                    // A directory is shown if anything below it may be read; the one the
                    // proxy always withholds is the host's identity credentials.
                    (_, Some("identity-credentials")) => {
                        format!("{base}identity-credentials/ec2/info")
                    }
                    (_, Some(_)) => return true,
                    (_, None) => format!("{base}{entry}"),
                };
                upstream.allows(&probe)
            })
            .await;
        }
        response
    }

    /// Proxy mode: the upstream's answer to a path imdsd does not own, if the caller may see it.
    async fn forward(&self, upstream: &Upstream, request: &Forward<'_>) -> Response<Body> {
        let r = &self.responder;
        let path = request.path_and_query.split('?').next().unwrap_or_default();
        // The listings that lead to allowed paths are always shown (filtered by the caller).
        let listing = matches!(
            path.trim_end_matches('/').rsplit_once('/'),
            Some(("", _)) | Some((_, "meta-data"))
        ) || path == "/";
        if !listing && !upstream.allows(path) {
            // "Not here", as for a path the instance does not have: a 403 would tell SDKs that
            // the metadata service is turned off.
            return r.error(StatusCode::NOT_FOUND);
        }
        match upstream
            .forward(request.method, request.path_and_query)
            .await
        {
            Ok(f) => r.forwarded(f.status, f.content_type, f.body),
            Err(e) => {
                tracing::warn!(path = request.path_and_query, error = %e, "cannot forward to the upstream metadata service");
                r.error(match e {
                    UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                    UpstreamError::Unreachable(_) => StatusCode::BAD_GATEWAY,
                })
            }
        }
    }

    /// `meta-data/iam/…`: present only for callers with a role.
    fn serve_iam(self: &Arc<Self>, sub: &str, workload: &Workload, now: SystemTime) -> Step {
        let r = &self.responder;
        let assignment = match &workload.role {
            RoleState::Assigned(a) => a,
            // Not attached on purpose: exactly an instance without a role, as far as it can tell.
            RoleState::None | RoleState::Unserved(_) => {
                return r.error(StatusCode::NOT_FOUND).into();
            }
            RoleState::Pending => {
                tracing::warn!(caller = %workload.ip, "answering 503: the container index has not synced with the Docker Engine yet");
                return r.error(StatusCode::SERVICE_UNAVAILABLE).into();
            }
            RoleState::Refused(refusal) => {
                return self.serve_refusal(sub, workload, refusal).into();
            }
        };
        // The credentials first: nearly every request is for them.
        if sub.strip_prefix("security-credentials/") == Some(assignment.role_name()) {
            return self.serve_credentials(assignment, now);
        }
        let response = match sub.split_once('/') {
            None if sub.is_empty() => r.ok(
                Bytes::from_static(b"info\nsecurity-credentials/"),
                ContentType::Text,
                None,
            ),
            None if sub == "info" => r.ok(self.iam_info(assignment), ContentType::Text, None),
            None if sub == "security-credentials" => r.ok(
                Bytes::from(assignment.role_name().to_string()),
                ContentType::Text,
                None,
            ),
            _ => r.error(StatusCode::NOT_FOUND),
        };
        response.into()
    }

    /// The `iam/` subtree of a caller whose role request was refused: the role is listed, and
    /// its credentials document carries the error, as EC2 reports a role it cannot assume.
    fn serve_refusal(&self, sub: &str, workload: &Workload, refusal: &Refusal) -> Response<Body> {
        let r = &self.responder;
        let error_document = || {
            let now = self.clock.now();
            let body = response::pretty_object(&[
                ("Code", response::json_str(refusal.code)),
                ("Message", response::json_str(&refusal.message)),
                ("LastUpdated", response::json_str(&format_iso8601(now))),
            ]);
            r.ok(Bytes::from(body), ContentType::Text, Some(now))
        };
        match sub.split_once('/') {
            None if sub.is_empty() => r.ok(
                Bytes::from_static(b"info\nsecurity-credentials/"),
                ContentType::Text,
                None,
            ),
            None if sub == "info" => error_document(),
            None if sub == "security-credentials" => {
                r.ok(Bytes::from(refusal.name.clone()), ContentType::Text, None)
            }
            Some(("security-credentials", name)) if name == refusal.name => {
                let container = workload.container.as_deref();
                tracing::warn!(
                    caller = %workload.ip,
                    container = container.map(|c| c.name.as_str()),
                    container_id = container.map(|c| c.short_id()),
                    code = refusal.code,
                    reason = %refusal.message,
                    "refused a role request"
                );
                error_document()
            }
            _ => r.error(StatusCode::NOT_FOUND),
        }
    }

    fn serve_credentials(self: &Arc<Self>, assignment: &Assignment, now: SystemTime) -> Step {
        match self.broker.get_now(&assignment.cache, now) {
            Lookup::Ready(answer) => self
                .credentials_response(assignment.request(), answer)
                .into(),
            Lookup::Wait(fetch) => {
                let (this, request) = (self.clone(), assignment.request().clone());
                Step::Wait(Box::pin(async move {
                    let answer = fetch.wait().await;
                    this.credentials_response(&request, answer).into()
                }))
            }
        }
    }

    /// The credentials document, EC2's error document for a role that cannot be assumed, or 503.
    fn credentials_response(
        &self,
        request: &AssumeRequest,
        answer: Result<Arc<Served>, FetchError>,
    ) -> Response<Body> {
        let r = &self.responder;
        match answer {
            Ok(served) => {
                let document = served.rendered(|served| Document {
                    body: credentials_document(served),
                    last_modified: response::http_date(served.last_updated),
                });
                r.ok_dated(document.body, ContentType::Text, document.last_modified)
            }
            Err(FetchError {
                error: SourceError::Denied { code, message },
                at,
            }) => {
                // EC2 reports a role it cannot assume as a 200 carrying the error code; SDKs then
                // report "no credentials" instead of retrying forever.
                let body = response::pretty_object(&[
                    ("Code", response::json_str(&code)),
                    ("Message", response::json_str(&message)),
                    ("LastUpdated", response::json_str(&format_iso8601(at))),
                ]);
                r.ok(Bytes::from(body), ContentType::Text, Some(at))
            }
            Err(FetchError {
                error: SourceError::Unavailable(message),
                ..
            }) => {
                tracing::warn!(role = %request.role_arn, error = %message, "answering 503: no credentials to serve");
                r.error(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    fn iam_info(&self, assignment: &Assignment) -> Bytes {
        let arn = &assignment.request().role_arn;
        let last_updated = self
            .broker
            .peek(assignment.request())
            .map_or_else(|| self.clock.now(), |s| s.last_updated);
        let profile_arn = format!(
            "arn:{}:iam::{}:instance-profile{}{}",
            arn.partition(),
            arn.account(),
            arn.path(),
            arn.name()
        );
        Bytes::from(response::pretty_object(&[
            ("Code", response::json_str("Success")),
            (
                "LastUpdated",
                response::json_str(&format_iso8601(last_updated)),
            ),
            ("InstanceProfileArn", response::json_str(&profile_arn)),
            (
                "InstanceProfileId",
                response::json_str(&instance_profile_id(arn.as_str())),
            ),
        ]))
    }

    /// How long tokens issued now for `binding` would be valid; for tests and the admin API.
    pub fn verify_token(&self, token: &str, binding: &str) -> Option<Duration> {
        self.tokens
            .verify(
                token.as_bytes(),
                binding.as_bytes(),
                std::time::SystemTime::now(),
            )
            .ok()
    }
}

/// What proxy mode forwards of a request.
struct Forward<'a> {
    method: &'a Method,
    path_and_query: &'a str,
}

/// Rewrites an upstream listing (sorted, LF-separated, no final LF, as EC2 writes them): keeps the
/// entries `keep` allows, and with `iam: Some(_)` puts `iam/` in or out.
async fn adjust_listing(
    r: &Responder,
    response: Response<Body>,
    iam: Option<bool>,
    keep: impl Fn(&str) -> bool,
) -> Response<Body> {
    use http_body_util::BodyExt as _;
    let (parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await;
    let bytes = collected.to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let mut entries: Vec<&str> = text
        .split('\n')
        .filter(|e| !e.is_empty() && *e != "iam/" && keep(e))
        .collect();
    let had_iam = text.split('\n').any(|e| e == "iam/");
    if iam.unwrap_or(had_iam) {
        entries.push("iam/");
        entries.sort_unstable();
    }
    r.forwarded(
        parts.status,
        parts.headers.get(header::CONTENT_TYPE).cloned(),
        Bytes::from(entries.join("\n")),
    )
}

/// The metrics route of a request path, by its shape alone (cheap, and no allocation).
fn route_of(path: &Result<MetadataPath<'_>, PathError>) -> Route {
    let (rest, versioned) = match path {
        Ok(MetadataPath::Root) => return Route::Metadata,
        Ok(MetadataPath::Versioned { rest, .. }) => (rest, true),
        Ok(MetadataPath::UnknownVersion { rest }) => (rest, false),
        Err(_) => return Route::Other,
    };
    if rest == "api/token" {
        return Route::Token;
    }
    match rest.strip_prefix(IAM_PREFIX) {
        Some("") => Route::Iam,
        Some(sub) if sub.starts_with('/') => match sub.strip_prefix("/security-credentials/") {
            Some(role) if !role.is_empty() => Route::Credentials,
            _ => Route::Iam,
        },
        _ if versioned => Route::Metadata,
        _ => Route::Other,
    }
}

/// EC2's credentials document: seven keys in EC2's order, pretty-printed, no final newline.
pub fn credentials_document(served: &Served) -> Bytes {
    let c = &served.credentials;
    Bytes::from(response::pretty_object(&[
        ("Code", response::json_str("Success")),
        (
            "LastUpdated",
            response::json_str(&format_iso8601(served.last_updated)),
        ),
        ("Type", response::json_str("AWS-HMAC")),
        ("AccessKeyId", response::json_str(&c.access_key_id)),
        (
            "SecretAccessKey",
            response::json_str(c.secret_access_key.expose()),
        ),
        ("Token", response::json_str(c.session_token.expose())),
        (
            "Expiration",
            response::json_str(&format_iso8601(c.expiration)),
        ),
    ]))
}

/// A stable `AIPA…` id for the instance profile named after a role, as IAM ids look.
fn instance_profile_id(arn: &str) -> String {
    use sha2::{Digest as _, Sha256};
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(arn.as_bytes());
    let mut id = String::from("AIPA");
    id.extend(
        digest
            .iter()
            .take(17)
            .map(|b| BASE32[usize::from(b & 31)] as char),
    );
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata service with fake credentials, telling containers apart through an index
    /// that has not synced with the engine (yet, or again after losing it).
    fn unsynced() -> (Arc<Imds>, crate::index::IndexWriter) {
        use crate::identity::IdentityConfig;
        use crate::identity::role::AccountContext;
        use crate::instance::{Instance, InstanceDefaults, InstanceSection};
        let clock: SharedClock = Arc::new(crate::clock::SystemClock);
        let mut identity = Identity::new(
            IdentityConfig {
                default_role: None,
                mapping: crate::identity::mapping::RoleMapping::default(),
                session_name_template: None,
                containers: crate::identity::container::ContainerRules::default(),
            },
            AccountContext {
                default_account: Some("123456789012".into()),
                partition: "aws".into(),
                aliases: std::collections::HashMap::new(),
            },
        )
        .expect("valid");
        let (index, writer) = crate::index::index();
        identity.attach_index(index);
        let source = Arc::new(crate::credentials::fake::FakeSource::new(
            Duration::from_secs(3600),
            clock.clone(),
        ));
        let instance = Instance::resolve(&InstanceSection::default(), &InstanceDefaults::default())
            .expect("valid");
        let imds = Imds::new(
            Tree::build(&instance),
            Tokens::new(token::TokenKey::from_bytes([7; 32])),
            Arc::new(identity),
            Broker::new(source, clock.clone(), Default::default()),
            ImdsOptions::default(),
            clock,
            Arc::new(Metrics::default()),
        );
        (Arc::new(imds), writer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_no_known_container_holds_gets_no_token_to_keep() {
        let (imds, mut writer) = unsynced();
        writer.set_networks(vec![crate::index::Subnet {
            network: "net".into(),
            net: "172.18.0.0/16".parse().expect("net"),
            gateway: Some("172.18.0.1".parse().expect("ip")),
            served: true,
        }]);
        let _ = writer.apply(crate::index::Change::Replace(Vec::new()));
        writer.set_ready();
        // After the bounded wait the caller is still nobody's: a token would be bound to nobody,
        // and its container, once known, would be refused with it for the token's hours.
        assert_eq!(
            ask(&imds, Method::PUT, "/latest/api/token", None).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Without a token, it is the unknown caller it is: no role.
        let listing = Request::builder()
            .uri("/latest/meta-data/iam/security-credentials/")
            .body(())
            .expect("request");
        let response = imds
            .clone()
            .handle(
                listing,
                "172.18.0.2".parse().expect("ip"),
                &ConnectionCaller::default(),
            )
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    async fn ask(imds: &Arc<Imds>, method: Method, path: &str, token: Option<&str>) -> StatusCode {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("x-aws-ec2-metadata-token", token);
        } else {
            request = request.header(TOKEN_TTL_HEADER, "21600");
        }
        let request = request.body(()).expect("request");
        let caller: IpAddr = "172.18.0.2".parse().expect("ip");
        imds.clone()
            .handle(request, caller, &ConnectionCaller::default())
            .await
            .status()
    }

    #[tokio::test(start_paused = true)]
    async fn until_the_index_has_synced_no_token_is_issued_or_accepted() {
        let (imds, _writer) = unsynced();
        // A token now would be bound to nobody the caller can ever be: refused, retryably.
        assert_eq!(
            ask(&imds, Method::PUT, "/latest/api/token", None).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // A token issued before the engine was lost cannot be checked against anybody now.
        let issued = imds
            .tokens
            .issue(b"ctr:someone:t1", 60, SystemTime::now())
            .expect("rng");
        assert_eq!(
            ask(
                &imds,
                Method::GET,
                "/latest/meta-data/iam/security-credentials/",
                Some(&issued)
            )
            .await,
            StatusCode::SERVICE_UNAVAILABLE,
            "a retryable 503, not the 401 that makes SDKs give up"
        );
    }

    #[test]
    fn requests_are_counted_by_the_route_they_parse_to() {
        for (raw, route) in [
            ("/", Route::Metadata),
            ("/latest/api/token", Route::Token),
            ("/2021-01-03/api/token/", Route::Token),
            ("/nonsense/api/token", Route::Token),
            (
                "/latest/meta-data/iam/security-credentials/app",
                Route::Credentials,
            ),
            (
                "//latest//meta-data/iam/security-credentials/app/",
                Route::Credentials,
            ),
            ("/latest/meta-data/iam/security-credentials/", Route::Iam),
            ("/latest/meta-data/iam/info", Route::Iam),
            ("/latest/meta-data/iam", Route::Iam),
            ("/latest/meta-data/iamx", Route::Metadata),
            ("/latest/meta-data/placement/region", Route::Metadata),
            ("/2009-04-04/user-data", Route::Metadata),
            ("/favicon.ico", Route::Other),
            ("/latest/%ff", Route::Other),
        ] {
            assert_eq!(route_of(&path::parse(raw)), route, "{raw}");
        }
    }
}
