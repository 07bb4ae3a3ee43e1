//! Who is calling, and which role they get: caller IP → [`Workload`].
//!
//! The order of precedence, first match wins: the role mapping file (exact IP, then the most
//! specific CIDR), then the default role, else no role at all (and so no `iam/` in the caller's
//! metadata). Every role named in configuration is resolved to an ARN at startup, so a typo fails
//! the start, not a request.
//!
//! This module decides; it does not fetch. It hands the HTTP layer an [`AssumeRequest`] whose
//! every field is part of the credential cache key.

pub mod mapping;
pub mod role;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use crate::credentials::AssumeRequest;
use mapping::{MappedRole, RoleMapping};
use role::{AccountContext, RoleSpec, sanitise_session_name};

/// The calling workload as far as the daemon can tell.
#[derive(Debug)]
pub struct Workload {
    pub ip: IpAddr,
    /// What IMDSv2 tokens are bound to: a token is valid only for the workload it was issued to.
    pub binding: String,
    pub role: RoleState,
}

/// The role a workload gets.
#[derive(Debug, Clone)]
pub enum RoleState {
    /// No role: the caller's metadata has no `iam/` subtree.
    None,
    Assigned(Arc<Assignment>),
}

impl RoleState {
    pub fn assignment(&self) -> Option<&Arc<Assignment>> {
        match self {
            RoleState::Assigned(a) => Some(a),
            RoleState::None => None,
        }
    }
}

/// A role granted to a workload, and why.
#[derive(Debug)]
pub struct Assignment {
    pub request: Arc<AssumeRequest>,
    pub origin: RoleOrigin,
}

impl Assignment {
    /// The name listed under `iam/security-credentials/`.
    pub fn role_name(&self) -> &str {
        self.request.role_arn.name()
    }
}

/// Where a role assignment came from, for logs and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleOrigin {
    /// The mapping file entry with this key.
    MappingFile(String),
    DefaultRole,
}

impl std::fmt::Display for RoleOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoleOrigin::MappingFile(key) => write!(f, "mapping file entry {key:?}"),
            RoleOrigin::DefaultRole => f.write_str("default role"),
        }
    }
}

/// Everything [`Identity`] needs, already parsed.
#[derive(Debug, Clone, Default)]
pub struct IdentityConfig {
    pub default_role: Option<RoleSpec>,
    pub mapping: RoleMapping,
    /// `RoleSessionName` template; see [`render_session_name`].
    pub session_name_template: String,
}

/// Placeholders a session-name template may use.
pub const SESSION_NAME_PLACEHOLDERS: &[&str] = &["ip"];

/// The default session-name template for callers that are not containers.
pub const DEFAULT_SESSION_NAME_TEMPLATE: &str = "imdsd-{ip}";

/// Checks that a template uses only known placeholders and balanced braces.
pub fn check_session_name_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("{template:?} has a '{{' without a matching '}}'"));
        };
        let name = &rest[open + 1..open + close];
        if !SESSION_NAME_PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "{template:?} uses the unknown placeholder {{{name}}}; known: {}",
                SESSION_NAME_PLACEHOLDERS
                    .iter()
                    .map(|p| format!("{{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("{template:?} has a '}}' without a matching '{{'"));
    }
    Ok(())
}

/// Fills a session-name template and sanitises the result to what STS accepts.
pub fn render_session_name(template: &str, ip: IpAddr) -> String {
    let ip_text = ip.to_string();
    let rendered = template.replace("{ip}", &ip_text);
    sanitise_session_name(&rendered, "imdsd")
}

/// Resolves callers to workloads. Cheap to share; lookups take a read lock for a map access.
#[derive(Debug)]
pub struct Identity {
    accounts: AccountContext,
    default_role: Option<role::RoleArn>,
    mapping: Vec<(String, MappedRole, role::RoleArn)>,
    raw_mapping: RoleMapping,
    session_name_template: String,
    /// Static resolution is pure, so its result per address is remembered.
    memo: RwLock<HashMap<IpAddr, Arc<Workload>>>,
}

/// Remembered addresses before the memo starts over; bounds memory under address scans.
const MEMO_LIMIT: usize = 65_536;

impl Identity {
    /// Resolves every configured role spec now; each failure is reported.
    pub fn new(config: IdentityConfig, accounts: AccountContext) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let default_role = config.default_role.as_ref().and_then(|spec| {
            spec.resolve(&accounts)
                .map_err(|e| problems.push(format!("default role: {e}")))
                .ok()
        });
        let mut mapping = Vec::new();
        for (key, mapped) in config.mapping.roles() {
            match mapped.spec.resolve(&accounts) {
                Ok(arn) => mapping.push((key.to_string(), mapped.clone(), arn)),
                Err(e) => problems.push(format!("role mapping file key {key:?}: {e}")),
            }
        }
        check_session_name_template(&config.session_name_template)
            .map_err(|e| problems.push(format!("session name template: {e}")))
            .ok();
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            accounts,
            default_role,
            mapping,
            raw_mapping: config.mapping,
            session_name_template: config.session_name_template,
            memo: RwLock::new(HashMap::new()),
        })
    }

    pub fn accounts(&self) -> &AccountContext {
        &self.accounts
    }

    pub fn default_role(&self) -> Option<&role::RoleArn> {
        self.default_role.as_ref()
    }

    /// The workload calling from `ip`.
    pub async fn resolve(&self, ip: IpAddr) -> Arc<Workload> {
        let ip = ip.to_canonical();
        if let Some(w) = self.memo.read().unwrap_or_else(|e| e.into_inner()).get(&ip) {
            return w.clone();
        }
        let workload = Arc::new(self.resolve_static(ip));
        let mut memo = self.memo.write().unwrap_or_else(|e| e.into_inner());
        if memo.len() >= MEMO_LIMIT {
            memo.clear();
        }
        memo.insert(ip, workload.clone());
        workload
    }

    /// Requests known before any caller arrives (exact-address mapping entries), for prefetching.
    pub fn known_requests(&self) -> Vec<Arc<AssumeRequest>> {
        self.raw_mapping
            .addresses()
            .filter_map(|ip| {
                self.resolve_static(ip)
                    .role
                    .assignment()
                    .map(|a| a.request.clone())
            })
            .collect()
    }

    fn resolve_static(&self, ip: IpAddr) -> Workload {
        let binding = format!("ip:{ip}");
        let role = if let Some((key, mapped)) = self.raw_mapping.lookup(ip) {
            self.mapping
                .iter()
                .find(|(k, _, _)| k == key)
                .map(|(_, _, arn)| {
                    let mut request = AssumeRequest::new(
                        arn.clone(),
                        mapped.session_name.clone().unwrap_or_else(|| {
                            render_session_name(&self.session_name_template, ip)
                        }),
                    );
                    request.external_id = mapped.external_id.clone();
                    RoleState::Assigned(Arc::new(Assignment {
                        request: Arc::new(request),
                        origin: RoleOrigin::MappingFile(key.to_string()),
                    }))
                })
                .unwrap_or(RoleState::None)
        } else if let Some(arn) = &self.default_role {
            RoleState::Assigned(Arc::new(Assignment {
                request: Arc::new(AssumeRequest::new(
                    arn.clone(),
                    render_session_name(&self.session_name_template, ip),
                )),
                origin: RoleOrigin::DefaultRole,
            }))
        } else {
            RoleState::None
        };
        Workload { ip, binding, role }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> AccountContext {
        AccountContext {
            default_account: Some("123456789012".into()),
            partition: "aws".into(),
            aliases: HashMap::new(),
        }
    }

    fn identity(default: Option<&str>, mapping: &str) -> Identity {
        Identity::new(
            IdentityConfig {
                default_role: default.map(|d| RoleSpec::parse(d).expect("spec")),
                mapping: RoleMapping::parse(mapping).expect("mapping"),
                session_name_template: DEFAULT_SESSION_NAME_TEMPLATE.into(),
            },
            accounts(),
        )
        .expect("valid")
    }

    #[tokio::test]
    async fn mapping_file_then_default_role_then_nothing() {
        let id = identity(
            Some("fallback"),
            r#"{"10.0.0.5": {"role": "mapped", "external_id": "ext-1", "session_name": "given"}}"#,
        );
        let w = id.resolve("10.0.0.5".parse().expect("ip")).await;
        let a = w.role.assignment().expect("role");
        assert_eq!(a.role_name(), "mapped");
        assert_eq!(a.request.external_id.as_deref(), Some("ext-1"));
        assert_eq!(a.request.session_name, "given");
        assert_eq!(a.origin, RoleOrigin::MappingFile("10.0.0.5".into()));

        let w = id.resolve("10.0.0.6".parse().expect("ip")).await;
        let a = w.role.assignment().expect("role");
        assert_eq!(
            a.request.role_arn.as_str(),
            "arn:aws:iam::123456789012:role/fallback"
        );
        assert_eq!(a.request.session_name, "imdsd-10.0.0.6");
        assert_eq!(a.origin, RoleOrigin::DefaultRole);

        let none = identity(None, "{}");
        assert!(
            none.resolve("10.0.0.6".parse().expect("ip"))
                .await
                .role
                .assignment()
                .is_none()
        );
    }

    #[tokio::test]
    async fn ipv4_mapped_ipv6_callers_are_their_ipv4_address() {
        let id = identity(None, r#"{"10.0.0.5": "mapped"}"#);
        let w = id.resolve("::ffff:10.0.0.5".parse().expect("ip")).await;
        assert!(w.role.assignment().is_some());
        assert_eq!(w.binding, "ip:10.0.0.5");
    }

    #[test]
    fn unresolvable_roles_fail_at_startup() {
        let err = Identity::new(
            IdentityConfig {
                default_role: Some(RoleSpec::parse("app@nowhere").expect("spec")),
                mapping: RoleMapping::parse(r#"{"10.0.0.5": "x@elsewhere"}"#).expect("mapping"),
                session_name_template: "{bogus}".into(),
            },
            accounts(),
        )
        .expect_err("invalid");
        assert_eq!(err.len(), 3, "{err:?}");
    }

    #[test]
    fn templates_are_checked_and_rendered() {
        assert!(check_session_name_template("imdsd-{ip}").is_ok());
        assert!(check_session_name_template("{nope}").is_err());
        assert!(check_session_name_template("a{ip").is_err());
        assert!(check_session_name_template("a}").is_err());
        assert_eq!(
            render_session_name("x-{ip}", "fd00::1".parse().expect("ip")),
            "x-fd00--1"
        );
    }
}
