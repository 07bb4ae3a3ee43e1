//! The container-credentials endpoint (`--ecs-listen`), the protocol ECS and EKS Pod Identity
//! use: a container that sets `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials` (or
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI`) gets its own role's credentials as one JSON document, no
//! token dance. The caller is identified by its IP exactly as for the metadata service, so it gets
//! the same role, the same cached session and the same refusals.
//!
//! Optionally (`--ecs-auth`) every request must carry `Authorization: <token>`, a per-container
//! token derived from the daemon's key and the container's name (so the operator can hand it out
//! before the container starts: `GET /v1/container-token?container=NAME` on the admin API), and
//! compared in constant time. See `reference/imds-protocol.md` §6 in the shared notes.
//!
//! The Host rule of every listener ([`crate::host`]) comes first: a `Host` that a rebinding web
//! page could have sent gets 403, as the EKS Pod Identity Agent answers a Host that is not its
//! address.

use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use crate::clock::format_iso8601;
use crate::credentials::SourceError;
use crate::credentials::broker::{Broker, FetchError};
use crate::host::{AllowedHosts, Refused as HostRefused};
use crate::identity::{Identity, RoleState, Workload};
use crate::logging::{ACCESS_TARGET, AccessLine, RepeatFilter, RepeatLimits};
use crate::metrics::{LISTENER_CONTAINER_CREDENTIALS, Metrics, REFUSED_HOST};

/// Paths served: `/v2/credentials` (ECS style) and `/v1/credentials` (EKS Pod Identity style),
/// and anything below them (`/v2/credentials/<id>`); the query string is ignored.
pub const PATH_PREFIXES: &[&str] = &["/v2/credentials", "/v1/credentials"];

/// Derives per-caller tokens for the `Authorization` header.
#[derive(Clone)]
pub struct AuthTokens {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for AuthTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthTokens(..)")
    }
}

impl AuthTokens {
    /// `key` is the daemon's secret (the IMDSv2 token key); a domain label keeps the two uses apart.
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.into() }
    }

    /// The token for a container name, or for a non-container caller's address (`ip:<addr>`).
    pub fn token_for(&self, subject: &str) -> String {
        use base64::Engine as _;
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            // HMAC accepts keys of any length; this cannot happen.
            return String::new();
        };
        mac.update(b"imdsd container-credentials v1\0");
        mac.update(subject.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Whose token a workload must present.
    pub fn subject(workload: &Workload) -> String {
        match &workload.container {
            Some(c) => c.name.clone(),
            None => format!("ip:{}", workload.ip),
        }
    }

    fn verify(&self, workload: &Workload, presented: &[u8]) -> bool {
        let expected = self.token_for(&Self::subject(workload));
        bool::from(expected.as_bytes().ct_eq(presented))
    }
}

/// The endpoint. Shared by every connection.
#[derive(Debug)]
pub struct Ecs {
    pub identity: Arc<Identity>,
    pub broker: Broker,
    /// `Some` when `Authorization` is required.
    pub auth: Option<AuthTokens>,
    /// Which identical access lines are written (see `crate::logging::RepeatFilter`); the
    /// metadata listener's own.
    pub access_log_limits: Arc<RepeatLimits>,
    /// The names accepted as `Host` besides addresses; the metadata listener's own.
    pub allowed_hosts: AllowedHosts,
    pub metrics: Arc<Metrics>,
    /// Which access lines of refused requests are written when the caller is not known without
    /// waiting (refusals do not wait for it).
    pub refusals: RepeatFilter,
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        serde_json::json!({ "code": code, "message": message }).to_string(),
    )
}

/// The answer to a request the Host rule refused: no credentials, and what to do instead.
fn host_refused(refused: HostRefused<'_>) -> Response<Full<Bytes>> {
    let message = match refused {
        HostRefused::Duplicate(_) => "the request has more than one Host header",
        HostRefused::NotAllowed(_) => {
            "the Host header names neither an IP address nor a name imdsd accepts; call the \
             endpoint by its address (e.g. http://169.254.170.2/v2/credentials), or list the name \
             with --allowed-host"
        }
    };
    error(refused.status(), "InvalidHost", message)
}

impl Ecs {
    pub async fn handle<B>(
        &self,
        req: Request<B>,
        caller: std::net::IpAddr,
    ) -> Response<Full<Bytes>> {
        let started = tokio::time::Instant::now();
        let refused_host = self.allowed_hosts.check_request(&req).err();
        let (response, workload) = match refused_host {
            Some(refused) => {
                self.metrics
                    .request_refused(LISTENER_CONTAINER_CREDENTIALS, REFUSED_HOST);
                (host_refused(refused), self.identity.resolve_now(caller))
            }
            None => self.route(&req, caller).await,
        };
        if tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            let workload = workload.as_deref();
            let line = AccessLine {
                method: req.method(),
                path: req.uri().path(),
                status: response.status(),
                agent: req
                    .headers()
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-"),
            };
            let filter = match workload {
                Some(w) => Some(&w.access_log),
                None => refused_host.map(|_| &self.refusals),
            };
            if let Some(suppressed) =
                line.admit(filter, &self.access_log_limits, started.into_std())
            {
                let container = workload.and_then(|w| w.container.as_deref());
                let role = workload
                    .filter(|_| refused_host.is_none())
                    .and_then(|w| w.role.assignment())
                    .map(|a| a.request().role_arn.as_str());
                let host = refused_host.map(|r| r.shown());
                tracing::info!(
                    target: ACCESS_TARGET,
                    endpoint = "container-credentials",
                    method = %line.method,
                    path = line.path,
                    caller = %caller,
                    container = container.map(|c| c.name.as_str()),
                    container_id = container.map(|c| c.short_id()),
                    role,
                    refused = refused_host.map(|_| REFUSED_HOST),
                    host = host.as_deref(),
                    status = line.status.as_u16(),
                    micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    agent = line.agent,
                    suppressed,
                );
            }
        }
        response
    }

    async fn route<B>(
        &self,
        req: &Request<B>,
        caller: std::net::IpAddr,
    ) -> (Response<Full<Bytes>>, Option<Arc<Workload>>) {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return (
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "use GET",
                ),
                None,
            );
        }
        let path = req.uri().path();
        let known = PATH_PREFIXES.iter().any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        });
        if !known {
            return (
                error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "container credentials are served under /v2/credentials (set \
                     AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials)",
                ),
                None,
            );
        }
        let workload = self.identity.resolve(caller).await;
        if let Some(auth) = &self.auth {
            let presented = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
            let ok = presented.is_some_and(|p| auth.verify(&workload, p));
            if !ok {
                let message = if presented.is_none() {
                    "an Authorization header is required (AWS_CONTAINER_AUTHORIZATION_TOKEN)"
                } else {
                    "the Authorization token is not this caller's"
                };
                return (
                    error(StatusCode::UNAUTHORIZED, "Unauthorized", message),
                    Some(workload),
                );
            }
        }
        let response = self.credentials(&workload).await;
        (response, Some(workload))
    }

    async fn credentials(&self, workload: &Workload) -> Response<Full<Bytes>> {
        let assignment = match &workload.role {
            RoleState::Assigned(a) => a,
            RoleState::None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "NoRole",
                    "this caller has no IAM role",
                );
            }
            RoleState::Refused(r) => return error(StatusCode::FORBIDDEN, r.code, &r.message),
            RoleState::Unserved(network) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "NetworkNotServed",
                    &format!(
                        "this container calls from the Docker network {network}, which imdsd does \
                         not serve: attach it to the metadata network, or name the network in \
                         --networks"
                    ),
                );
            }
            RoleState::Pending => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the container index is not synced with the Docker Engine yet",
                );
            }
        };
        match self
            .broker
            .get_via(&assignment.cache, self.broker.now())
            .await
        {
            Ok(served) => {
                let c = &served.credentials;
                let arn = &assignment.request().role_arn;
                let body = serde_json::json!({
                    "AccessKeyId": c.access_key_id,
                    "SecretAccessKey": c.secret_access_key.expose(),
                    "Token": c.session_token.expose(),
                    "Expiration": format_iso8601(c.expiration),
                    "RoleArn": arn.as_str(),
                    "AccountId": arn.account(),
                });
                json_response(StatusCode::OK, body.to_string())
            }
            Err(FetchError {
                error: SourceError::Denied { code, message },
                ..
            }) => error(StatusCode::FORBIDDEN, &code, &message),
            Err(FetchError {
                error: SourceError::Unavailable(message),
                ..
            }) => {
                tracing::warn!(role = %assignment.request().role_arn, error = %message, "answering 503: no credentials to serve");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!(
                        "credentials for {} are not available right now; retry",
                        assignment.request().role_arn
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_subject_and_keyed() {
        let a = AuthTokens::new(b"key-one");
        let b = AuthTokens::new(b"key-two");
        assert_eq!(a.token_for("web"), a.token_for("web"));
        assert_ne!(a.token_for("web"), a.token_for("db"));
        assert_ne!(a.token_for("web"), b.token_for("web"));
        // Safe in a header and an environment variable: no newline, no padding.
        let t = a.token_for("web");
        assert!(
            t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{t}"
        );
        assert_eq!(t.len(), 43);
    }
}
