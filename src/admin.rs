//! The admin API, on its own listener (`--admin-listen`, loopback by default, never the metadata
//! address): `/healthz`, `/readyz`, `/metrics` (Prometheus) and `/v1/workloads` (which container
//! gets which role). Read-only; it never shows a secret.
//!
//! It applies the Host rule of every listener ([`crate::host`]): loopback is no protection from a
//! web page that rebinds a name of its own to 127.0.0.1, and `/v1/container-token` hands out what
//! unlocks the container-credentials endpoint. A refused request gets a plain-text 403 and a
//! warning in the log, at most a few a second (a flood is counted, not written).

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::clock::format_iso8601;
use crate::credentials::broker::Broker;
use crate::credentials::observed::SourceHealth;
use crate::ecs::AuthTokens;
use crate::host::{AllowedHosts, Refused as HostRefused, shown};
use crate::identity::{Identity, RoleState};
use crate::index::Index;
use crate::logging::Throttle;
use crate::metrics::{LISTENER_ADMIN, Metrics, REFUSED_HOST};

/// Warnings about refused requests written per second ([`Admin::refusal_warnings`]); the rest
/// are counted.
pub const REFUSAL_WARNINGS_PER_SECOND: u32 = 5;

/// What the admin API reads.
pub struct Admin {
    pub registry: Registry,
    pub broker: Broker,
    pub identity: Arc<Identity>,
    pub index: Option<Index>,
    pub source: SourceHealth,
    /// Derives the container-credentials endpoint's per-container tokens.
    pub container_tokens: AuthTokens,
    /// The names accepted as `Host` besides addresses; the metadata listener's own.
    pub allowed_hosts: AllowedHosts,
    pub metrics: Arc<Metrics>,
    /// Keeps the warnings about refused requests to a few a second.
    pub refusal_warnings: Throttle,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

impl Admin {
    pub async fn handle<B>(
        &self,
        req: Request<B>,
        caller: std::net::IpAddr,
    ) -> Response<Full<Bytes>> {
        if let Err(refused) = self.allowed_hosts.check_request(&req) {
            return self.refuse_host(&req, caller, refused);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n");
        }
        match req.uri().path() {
            "/healthz" => respond(StatusCode::OK, TEXT, "ok\n"),
            "/readyz" => match self.not_ready() {
                reasons if reasons.is_empty() => respond(StatusCode::OK, TEXT, "ready\n"),
                reasons => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready:\n{}\n", reasons.join("\n")),
                ),
            },
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                crate::metrics::render(&self.registry),
            ),
            "/v1/workloads" => respond(StatusCode::OK, JSON, format!("{:#}\n", self.workloads())),
            "/v1/container-token" => self.container_token(req.uri().query().unwrap_or_default()),
            _ => respond(
                StatusCode::NOT_FOUND,
                TEXT,
                "not found; try /healthz, /readyz, /metrics or /v1/workloads\n",
            ),
        }
    }

    /// A request the Host rule refused: counted, warned about (within the throttle), and answered
    /// with nothing but the fix.
    fn refuse_host<B>(
        &self,
        req: &Request<B>,
        caller: std::net::IpAddr,
        refused: HostRefused<'_>,
    ) -> Response<Full<Bytes>> {
        self.metrics.request_refused(LISTENER_ADMIN, REFUSED_HOST);
        if let Some(suppressed) = self.refusal_warnings.admit(std::time::Instant::now()) {
            tracing::warn!(
                caller = %caller,
                method = %req.method(),
                path = shown(req.uri().path().as_bytes()),
                host = refused.shown(),
                status = refused.status().as_u16(),
                suppressed,
                "refused an admin API request for its Host header (a web page rebinding a name to \
                 this address sends its own name); call the admin API by its address, or list the \
                 name with --allowed-host"
            );
        }
        let body = match refused {
            HostRefused::Duplicate(_) => "bad request: more than one Host header\n",
            HostRefused::NotAllowed(_) => {
                "forbidden: the Host header must be an IP address, localhost, or a name listed \
                 with --allowed-host\n"
            }
        };
        respond(refused.status(), TEXT, body)
    }

    /// `?container=NAME` (a container's name, known before it starts) or `?ip=ADDR` (a caller
    /// that is not a container): the token it must send to the container-credentials endpoint
    /// when `--ecs-auth` is on.
    fn container_token(&self, query: &str) -> Response<Full<Bytes>> {
        let mut subject = None;
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            match k {
                "container" if !v.is_empty() => {
                    subject = Some(v.trim_start_matches('/').to_string())
                }
                "ip" => match v.parse::<std::net::IpAddr>() {
                    Ok(ip) => subject = Some(format!("ip:{}", ip.to_canonical())),
                    Err(_) => {
                        return respond(
                            StatusCode::BAD_REQUEST,
                            TEXT,
                            format!("{v:?} is not an IP address\n"),
                        );
                    }
                },
                _ => {}
            }
        }
        match subject {
            Some(s) => respond(StatusCode::OK, TEXT, self.container_tokens.token_for(&s)),
            None => respond(
                StatusCode::BAD_REQUEST,
                TEXT,
                "give ?container=NAME or ?ip=ADDR\n",
            ),
        }
    }

    /// Why the daemon should not receive traffic, one reason per line; empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(index) = &self.index
            && !index.is_ready()
        {
            reasons.push(
                "the container index is not synced with the Docker Engine (is Docker running and \
                 its socket readable?)"
                    .to_string(),
            );
        }
        if let Some(problem) = self.source.problem() {
            reasons.push(problem);
        }
        reasons
    }

    /// Every running container the index knows, with its role and credentials' state.
    fn workloads(&self) -> Value {
        let Some(index) = &self.index else {
            return json!([]);
        };
        let mut containers = index.containers();
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        let list: Vec<Value> = containers
            .iter()
            .filter_map(|c| {
                let workload = self.identity.container_workload(c)?;
                let mut entry = json!({
                    "container": {
                        "id": c.id,
                        "name": c.name,
                        "image": c.image,
                        "started_at": c.started_at,
                        "addresses": c.addresses,
                        "networks": c.networks,
                    },
                });
                match &workload.role {
                    RoleState::Assigned(a) => {
                        let r = a.request();
                        entry["role"] = json!(r.role_arn.as_str());
                        entry["origin"] = json!(a.origin.to_string());
                        entry["session_name"] = json!(r.session_name);
                        if let Some(served) = self.broker.peek(r) {
                            entry["expiration"] = json!(format_iso8601(served.expiration()));
                            entry["last_updated"] = json!(format_iso8601(served.last_updated));
                            entry["access_key_id"] = json!(served.credentials.key_hint());
                        }
                        if let Some(e) = self.broker.last_error(r) {
                            entry["last_error"] = json!({
                                "message": e.error.to_string(),
                                "at": format_iso8601(e.at),
                            });
                        }
                    }
                    RoleState::Refused(refusal) => {
                        entry["refused"] =
                            json!({"code": refusal.code, "message": refusal.message});
                    }
                    RoleState::None | RoleState::Pending | RoleState::Unserved(_) => {
                        entry["role"] = Value::Null
                    }
                }
                Some(entry)
            })
            .collect();
        Value::Array(list)
    }
}
