//! Who is calling, and which role they get: caller IP → [`Workload`].
//!
//! A caller is first looked up in the container index (see [`crate::index`]). For a container,
//! first match wins: the role the container names itself (see [`container`]: alias label, role
//! label, `IAM_ROLE`), checked against the operator's rules; then the role mapping file (exact IP,
//! then the most specific CIDR); then the default role; else no role. A caller that is not a
//! container (the host, a VM) gets the mapping file, then the default role.
//!
//! Two rules keep one container from ever getting another's role:
//! - an address inside a container network that no running container owns is served no role at
//!   all (after a bounded wait for the container's start event), never the default;
//! - a workload, and every IMDSv2 token issued to it, is bound to one container incarnation (id
//!   and start time), so a token from a dead container is worthless to the next one on its IP.
//!
//! This module decides; it does not fetch. It hands the HTTP layer an [`AssumeRequest`] whose
//! every field is part of the credential cache key.

pub mod container;
pub mod mapping;
pub mod role;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use crate::credentials::AssumeRequest;
use crate::credentials::broker::EntryHandle;
use crate::imds::token::Binding;
use crate::index::{Container, Index, Lookup};
use crate::logging::RepeatFilter;
use container::{ContainerRules, Decision};
use mapping::{MappedRole, RoleMapping};
use role::{AccountContext, RoleArn, RoleSpec, sanitise_session_name};

/// The calling workload as far as the daemon can tell.
#[derive(Debug)]
pub struct Workload {
    pub ip: IpAddr,
    /// What IMDSv2 tokens are bound to, with the last token this workload presented that
    /// checked out (the memo keeps a workload for as long as its caller is the same, and SDKs
    /// reuse a token for hours).
    pub binding: Binding,
    /// The container calling, if the caller is one the index knows.
    pub container: Option<Arc<Container>>,
    pub role: RoleState,
    /// Keeps this workload's identical access lines to a few a second.
    pub access_log: RepeatFilter,
}

/// The binding of a caller from a served container network whose address no known container
/// holds (after the bounded wait).
const UNPLACED: &str = "unknown:";

impl Workload {
    /// Whether the caller is in a served container network but no container the index knows
    /// holds its address, even after the bounded wait: nothing can be bound to it yet.
    pub fn unplaced(&self) -> bool {
        self.binding.as_str().starts_with(UNPLACED)
    }
}

/// The role a workload gets.
#[derive(Debug, Clone)]
pub enum RoleState {
    /// No role: the caller's metadata has no `iam/` subtree.
    None,
    Assigned(Arc<Assignment>),
    /// The caller asked for a role it may not have, or named it wrongly: it is told why, and no
    /// STS call is made.
    Refused(Arc<Refusal>),
    /// The container index has not synced yet, so the caller cannot be told apart from a
    /// container; role routes answer 503, which SDKs retry.
    Pending,
    /// A container calling from a Docker network imdsd does not serve (named here): no role,
    /// whoever it is, and the refusal is logged and counted.
    Unserved(Arc<str>),
}

impl RoleState {
    fn granted(granted: Option<(AssumeRequest, RoleOrigin)>) -> Self {
        match granted {
            Some((request, origin)) => RoleState::Assigned(Arc::new(Assignment {
                origin,
                cache: EntryHandle::new(Arc::new(request)),
            })),
            None => RoleState::None,
        }
    }

    fn refused(name: String, code: &'static str, message: String) -> Self {
        RoleState::Refused(Arc::new(Refusal {
            name,
            code,
            message,
        }))
    }

    pub fn assignment(&self) -> Option<&Arc<Assignment>> {
        match self {
            RoleState::Assigned(a) => Some(a),
            _ => None,
        }
    }

    /// The name listed under `iam/security-credentials/`, if any.
    pub fn listed_name(&self) -> Option<&str> {
        match self {
            RoleState::Assigned(a) => Some(a.role_name()),
            RoleState::Refused(r) => Some(&r.name),
            RoleState::None | RoleState::Pending | RoleState::Unserved(_) => None,
        }
    }
}

/// A role granted to a workload, and why.
#[derive(Debug)]
pub struct Assignment {
    pub origin: RoleOrigin,
    /// The role request, and where its credentials are cached once asked for: the memo keeps
    /// this assignment for as long as the caller is the same, so the credentials are found
    /// without a map lookup.
    pub cache: EntryHandle,
}

impl Assignment {
    /// What is asked of STS for this workload.
    pub fn request(&self) -> &Arc<AssumeRequest> {
        self.cache.key()
    }

    /// The name listed under `iam/security-credentials/`.
    pub fn role_name(&self) -> &str {
        self.request().role_arn.name()
    }
}

/// A refused role request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What the caller sees listed: the requested role's name, made safe for a path segment.
    pub name: String,
    /// An EC2-style error code (`AccessDenied`, `InvalidRoleSpec`, …).
    pub code: &'static str,
    pub message: String,
}

/// Where a role assignment came from, for logs and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleOrigin {
    /// The mapping file entry with this key.
    MappingFile(String),
    DefaultRole,
    /// The container's own label or environment variable with this name.
    Container(String),
    /// A role alias, chosen by the container.
    Alias(String),
}

impl std::fmt::Display for RoleOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoleOrigin::MappingFile(key) => write!(f, "mapping file entry {key:?}"),
            RoleOrigin::DefaultRole => f.write_str("default role"),
            RoleOrigin::Container(from) => write!(f, "container {from}"),
            RoleOrigin::Alias(alias) => write!(f, "role alias {alias:?}"),
        }
    }
}

/// Everything [`Identity`] needs, already parsed.
#[derive(Debug, Clone, Default)]
pub struct IdentityConfig {
    pub default_role: Option<RoleSpec>,
    pub mapping: RoleMapping,
    /// `RoleSessionName` template; `None` is `{container_name}` for containers and `imdsd-{ip}`
    /// for other callers. See [`render_session_name`].
    pub session_name_template: Option<String>,
    pub containers: ContainerRules,
}

/// Placeholders a session-name template may use.
pub const SESSION_NAME_PLACEHOLDERS: &[&str] = &["ip", "container_name", "container_id", "image"];

/// The session-name template for callers that are not containers.
pub const DEFAULT_SESSION_NAME_TEMPLATE: &str = "imdsd-{ip}";
/// The session-name template for containers: their name shows in CloudTrail.
pub const DEFAULT_CONTAINER_SESSION_NAME_TEMPLATE: &str = "{container_name}";

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

/// Fills a session-name template and sanitises the result to what STS accepts. A template that
/// uses container placeholders falls back to `imdsd-{ip}` for callers that are not containers.
pub fn render_session_name(template: &str, ip: IpAddr, container: Option<&Container>) -> String {
    let ip_text = ip.to_string();
    let rendered = match container {
        Some(c) => template
            .replace("{ip}", &ip_text)
            .replace("{container_name}", &c.name)
            .replace("{container_id}", c.short_id())
            .replace("{image}", &c.image),
        None if template.contains("{container_") || template.contains("{image}") => {
            DEFAULT_SESSION_NAME_TEMPLATE.replace("{ip}", &ip_text)
        }
        None => template.replace("{ip}", &ip_text),
    };
    sanitise_session_name(&rendered, "imdsd")
}

/// Resolves callers to workloads. Cheap to share; a known caller costs two read-locked map
/// lookups (the index and the memo) and no I/O.
#[derive(Debug)]
pub struct Identity {
    accounts: AccountContext,
    default_role: Option<RoleArn>,
    mapping: Vec<(String, MappedRole, RoleArn)>,
    raw_mapping: RoleMapping,
    session_name_template: Option<String>,
    rules: ContainerRules,
    aliases: BTreeMap<String, RoleArn>,
    index: Option<Index>,
    /// Resolution is pure given the caller's container, so its result per address is remembered,
    /// together with the container incarnation it was computed for.
    /// Hashed with foldhash, seeded per process: this lookup is on every request, and SipHash
    /// costs several times as much for a 16-byte key.
    memo: RwLock<foldhash::HashMap<IpAddr, Arc<Workload>>>,
}

/// Who one connection's caller was found to be, with the Docker index generation it was found
/// at: a kept-alive connection (an SDK refreshing, a busy client) then skips the lookup. A
/// connection's address cannot change, and whatever changes who is behind an address (a container
/// starting, stopping or restarting) changes the index and so its generation.
#[derive(Default)]
pub struct ConnectionCaller(Cell<Option<(u64, Arc<Workload>)>>);

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
        let mut aliases = BTreeMap::new();
        for (alias, spec) in &config.containers.aliases {
            match spec.resolve(&accounts) {
                Ok(arn) => {
                    aliases.insert(alias.clone(), arn);
                }
                Err(e) => problems.push(format!("role_aliases.{alias}: {e}")),
            }
        }
        if let Some(t) = &config.session_name_template {
            check_session_name_template(t)
                .map_err(|e| problems.push(format!("session name template: {e}")))
                .ok();
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            accounts,
            default_role,
            mapping,
            raw_mapping: config.mapping,
            session_name_template: config.session_name_template,
            rules: config.containers,
            aliases,
            index: None,
            memo: RwLock::default(),
        })
    }

    /// Tells containers apart through `index` from now on.
    pub fn attach_index(&mut self, index: Index) {
        self.index = Some(index);
    }

    pub fn accounts(&self) -> &AccountContext {
        &self.accounts
    }

    pub fn default_role(&self) -> Option<&RoleArn> {
        self.default_role.as_ref()
    }

    pub fn rules(&self) -> &ContainerRules {
        &self.rules
    }

    /// The workload calling from `ip`. Waits (bounded) only for an address that may belong to a
    /// container the index has not heard of yet.
    pub async fn resolve(&self, ip: IpAddr) -> Arc<Workload> {
        if let Some(workload) = self.resolve_now(ip) {
            return workload;
        }
        let ip = ip.to_canonical();
        let Some(index) = &self.index else {
            return self.memoised(ip, None);
        };
        // Boxed: only callers the index does not know yet wait, and the wait's timer kept inline
        // would enlarge every request's future.
        match Box::pin(index.lookup_or_wait(ip, self.rules.unknown_caller_wait)).await {
            Lookup::Container(c) => self.memoised(ip, Some(c)),
            Lookup::NotAContainer => self.memoised(ip, None),
            Lookup::UnknownContainer => {
                tracing::debug!(caller = %ip, "no running container has this address: no role");
                Arc::new(Workload {
                    ip,
                    binding: Binding::new(format!("{UNPLACED}{ip}")),
                    container: None,
                    role: RoleState::None,
                    access_log: RepeatFilter::default(),
                })
            }
            Lookup::Unserved(network) => {
                tracing::debug!(caller = %ip, network = %network, "a container on a network imdsd does not serve: no role");
                Arc::new(Workload {
                    ip,
                    binding: Binding::new(format!("unserved:{ip}")),
                    container: None,
                    role: RoleState::Unserved(network),
                    access_log: RepeatFilter::default(),
                })
            }
            Lookup::NotSynced => Arc::new(Workload {
                ip,
                binding: Binding::new(format!("pending:{ip}")),
                container: None,
                role: RoleState::Pending,
                access_log: RepeatFilter::default(),
            }),
        }
    }

    /// [`Identity::resolve_now`] for a request on `connection`: the workload found for an
    /// earlier request on it while the Docker index has not changed since, else looked up (and
    /// kept for the next request when found without waiting).
    pub fn resolve_now_on(
        &self,
        ip: IpAddr,
        connection: &ConnectionCaller,
    ) -> Option<Arc<Workload>> {
        // Read before the lookup: a change racing with it leaves an older generation beside the
        // answer, so the next request looks again.
        let generation = self.index.as_ref().map_or(0, Index::generation);
        if let Some((seen, workload)) = connection.0.take()
            && seen == generation
        {
            connection.0.set(Some((seen, workload.clone())));
            return Some(workload);
        }
        let workload = self.resolve_now(ip)?;
        connection.0.set(Some((generation, workload.clone())));
        Some(workload)
    }

    /// [`Identity::resolve`] when it needs no waiting: always without a Docker index, for
    /// loopback, and for a caller a synced index knows; `None` otherwise.
    pub fn resolve_now(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let ip = ip.to_canonical();
        let Some(index) = &self.index else {
            return Some(self.memoised(ip, None));
        };
        // Loopback traffic never comes from a container's network namespace.
        if ip.is_loopback() {
            return Some(self.memoised(ip, None));
        }
        if index.is_ready()
            && let Some(c) = index.lookup(ip)
        {
            return Some(self.memoised(ip, Some(c)));
        }
        None
    }

    /// The workload of a container, without waiting: for prefetching when it starts.
    pub fn container_workload(&self, c: &Arc<Container>) -> Option<Arc<Workload>> {
        let ip = c.addresses.first()?.to_canonical();
        Some(self.memoised(ip, Some(c.clone())))
    }

    /// Forgets what was remembered for a container that stopped.
    pub fn forget(&self, c: &Container) {
        let mut memo = self.memo.write().unwrap_or_else(|e| e.into_inner());
        for ip in &c.addresses {
            let ip = ip.to_canonical();
            if memo
                .get(&ip)
                .is_some_and(|w| w.container.as_ref().is_some_and(|k| k.id == c.id))
            {
                memo.remove(&ip);
            }
        }
    }

    fn memoised(&self, ip: IpAddr, container: Option<Arc<Container>>) -> Arc<Workload> {
        let same = |w: &Workload| match (&w.container, &container) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        };
        if let Some(w) = self.memo.read().unwrap_or_else(|e| e.into_inner()).get(&ip)
            && same(w)
        {
            return w.clone();
        }
        let workload = Arc::new(match container {
            Some(c) => self.resolve_container(ip, c),
            None => self.resolve_static(ip),
        });
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
                    .map(|a| a.request().clone())
            })
            .collect()
    }

    fn session_name(&self, ip: IpAddr, container: Option<&Container>) -> String {
        let template = self
            .session_name_template
            .as_deref()
            .unwrap_or(match container {
                Some(_) => DEFAULT_CONTAINER_SESSION_NAME_TEMPLATE,
                None => DEFAULT_SESSION_NAME_TEMPLATE,
            });
        render_session_name(template, ip, container)
    }

    /// The operator's fallbacks: the mapping file, then the default role.
    fn fallback(
        &self,
        ip: IpAddr,
        container: Option<&Container>,
    ) -> Option<(AssumeRequest, RoleOrigin)> {
        if let Some((key, mapped)) = self.raw_mapping.lookup(ip) {
            let (_, _, arn) = self.mapping.iter().find(|(k, _, _)| k == key)?;
            let mut request = AssumeRequest::new(
                arn.clone(),
                mapped
                    .session_name
                    .clone()
                    .unwrap_or_else(|| self.session_name(ip, container)),
            );
            request.external_id = mapped.external_id.clone();
            return Some((request, RoleOrigin::MappingFile(key.to_string())));
        }
        let arn = self.default_role.as_ref()?;
        Some((
            AssumeRequest::new(arn.clone(), self.session_name(ip, container)),
            RoleOrigin::DefaultRole,
        ))
    }

    fn resolve_static(&self, ip: IpAddr) -> Workload {
        Workload {
            ip,
            binding: Binding::new(format!("ip:{ip}")),
            container: None,
            role: RoleState::granted(self.fallback(ip, None)),
            access_log: RepeatFilter::default(),
        }
    }

    fn resolve_container(&self, ip: IpAddr, c: Arc<Container>) -> Workload {
        Workload {
            ip,
            binding: Binding::new(c.binding()),
            role: self.container_role(ip, &c),
            container: Some(c),
            access_log: RepeatFilter::default(),
        }
    }

    fn container_role(&self, ip: IpAddr, c: &Container) -> RoleState {
        let rules = &self.rules;
        let mut granted = match container::requested(rules, c) {
            Some(req) => match container::decide(rules, &self.aliases, &self.accounts, &req) {
                Decision::Grant { arn, alias } => {
                    let origin = match alias {
                        Some(a) => RoleOrigin::Alias(a),
                        None => RoleOrigin::Container(req.from.describe()),
                    };
                    Some((
                        AssumeRequest::new(arn, self.session_name(ip, Some(c))),
                        origin,
                    ))
                }
                Decision::Refuse { code, message } => {
                    let written = req.value.rsplit(['/', ':']).next().unwrap_or_default();
                    return RoleState::refused(
                        sanitise_session_name(written, "invalid-role"),
                        code,
                        message,
                    );
                }
            },
            None => self.fallback(ip, Some(c)),
        };
        if let Some((request, origin)) = granted.as_mut() {
            // The container's own additions. A mapping-file entry's external id and session name
            // are the operator's and win.
            let from_mapping = matches!(origin, RoleOrigin::MappingFile(_));
            if request.external_id.is_none() {
                request.external_id = container::external_id(rules, c);
            }
            if let Some(policy) = container::policy(rules, c) {
                if serde_json::from_str::<serde_json::Value>(&policy).is_err() {
                    return RoleState::refused(
                        request.role_arn.name().to_string(),
                        "MalformedPolicyDocument",
                        format!(
                            "the container's session policy ({}.policy label or {} variable) is not JSON",
                            rules.label_prefix,
                            container::POLICY_ENV
                        ),
                    );
                }
                request.policy = Some(policy);
            }
            if !from_mapping && let Some(name) = container::session_key_value(rules, c) {
                request.session_name = sanitise_session_name(&name, "imdsd");
            }
        }
        RoleState::granted(granted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> AccountContext {
        AccountContext {
            default_account: Some("123456789012".into()),
            partition: "aws".into(),
            aliases: std::collections::HashMap::new(),
        }
    }

    fn identity(default: Option<&str>, mapping: &str) -> Identity {
        Identity::new(
            IdentityConfig {
                default_role: default.map(|d| RoleSpec::parse(d).expect("spec")),
                mapping: RoleMapping::parse(mapping).expect("mapping"),
                session_name_template: None,
                containers: ContainerRules::default(),
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
        assert_eq!(a.request().external_id.as_deref(), Some("ext-1"));
        assert_eq!(a.request().session_name, "given");
        assert_eq!(a.origin, RoleOrigin::MappingFile("10.0.0.5".into()));

        let w = id.resolve("10.0.0.6".parse().expect("ip")).await;
        let a = w.role.assignment().expect("role");
        assert_eq!(
            a.request().role_arn.as_str(),
            "arn:aws:iam::123456789012:role/fallback"
        );
        assert_eq!(a.request().session_name, "imdsd-10.0.0.6");
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
        assert_eq!(w.binding.as_str(), "ip:10.0.0.5");
    }

    #[test]
    fn unresolvable_roles_fail_at_startup() {
        let err = Identity::new(
            IdentityConfig {
                default_role: Some(RoleSpec::parse("app@nowhere").expect("spec")),
                mapping: RoleMapping::parse(r#"{"10.0.0.5": "x@elsewhere"}"#).expect("mapping"),
                session_name_template: Some("{bogus}".into()),
                containers: ContainerRules::default(),
            },
            accounts(),
        )
        .expect_err("invalid");
        assert_eq!(err.len(), 3, "{err:?}");
    }

    fn ctr(id: &str, ip: &str, env: &[(&str, &str)], labels: &[(&str, &str)]) -> Container {
        Container {
            id: format!("{id:0<64}"),
            name: format!("name-{id}"),
            started_at: "2026-11-23T00:00:00Z".into(),
            image: "app:1".into(),
            addresses: vec![ip.parse().expect("ip")],
            networks: vec!["net".into()],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    fn with_index(
        default: Option<&str>,
        rules: ContainerRules,
    ) -> (Identity, crate::index::IndexWriter) {
        let mut id = Identity::new(
            IdentityConfig {
                default_role: default.map(|d| RoleSpec::parse(d).expect("spec")),
                mapping: RoleMapping::default(),
                session_name_template: None,
                containers: rules,
            },
            accounts(),
        )
        .expect("valid");
        let (index, mut writer) = crate::index::index();
        writer.set_networks(vec![crate::index::Subnet {
            network: "net".into(),
            net: "172.18.0.0/16".parse().expect("net"),
            gateway: Some("172.18.0.1".parse().expect("ip")),
            served: true,
        }]);
        let _ = writer.apply(crate::index::Change::Replace(Vec::new()));
        writer.set_ready();
        id.attach_index(index);
        (id, writer)
    }

    #[tokio::test]
    async fn containers_get_their_own_role_and_strangers_get_none() {
        let (id, mut w) = with_index(Some("fallback"), ContainerRules::default());
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "a",
            "172.18.0.2",
            &[("IAM_ROLE", "app-a"), ("IAM_EXTERNAL_ID", "x-1")],
            &[],
        )));
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "b",
            "172.18.0.3",
            &[],
            &[],
        )));
        let a = id.resolve("172.18.0.2".parse().expect("ip")).await;
        let assigned = a.role.assignment().expect("role");
        assert_eq!(assigned.role_name(), "app-a");
        assert_eq!(assigned.request().session_name, "name-a");
        assert_eq!(assigned.request().external_id.as_deref(), Some("x-1"));
        assert!(a.binding.as_str().starts_with("ctr:a"));
        // No role of its own: the default role, under its own session name.
        let b = id.resolve("172.18.0.3".parse().expect("ip")).await;
        let assigned = b.role.assignment().expect("default");
        assert_eq!(
            (
                assigned.role_name(),
                assigned.request().session_name.as_str()
            ),
            ("fallback", "name-b")
        );
        // An address in a container network that no container owns: nothing, never the default.
        let stranger = id.resolve("172.18.0.9".parse().expect("ip")).await;
        assert!(matches!(stranger.role, RoleState::None));
        // The gateway is the host: the default role.
        let host = id.resolve("172.18.0.1".parse().expect("ip")).await;
        assert_eq!(
            host.role
                .assignment()
                .expect("default")
                .request()
                .session_name,
            "imdsd-172.18.0.1"
        );
    }

    #[test]
    fn a_connection_keeps_its_caller_until_the_index_changes() {
        let (id, mut w) = with_index(None, ContainerRules::default());
        let ip: IpAddr = "172.18.0.2".parse().expect("ip");
        let connection = ConnectionCaller::default();
        let role = |w: &Workload| w.role.assignment().map(|a| a.role_name().to_string());
        // Not in the index yet: nothing now, and nothing kept.
        assert!(id.resolve_now_on(ip, &connection).is_none());
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "a",
            "172.18.0.2",
            &[("IAM_ROLE", "app-a")],
            &[],
        )));
        let first = id.resolve_now_on(ip, &connection).expect("known");
        assert_eq!(role(&first).as_deref(), Some("app-a"));
        // The same workload for the connection's next request, without looking it up: the
        // memo is emptied here, so only the connection can have kept it.
        id.memo.write().expect("memo").clear();
        let again = id.resolve_now_on(ip, &connection).expect("kept");
        assert!(Arc::ptr_eq(&first, &again));
        // Another container on the address (a restart with another role): the index changed,
        // so the connection looks again.
        let _ = w.apply(crate::index::Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "b",
            "172.18.0.2",
            &[("IAM_ROLE", "app-b")],
            &[],
        )));
        let after = id.resolve_now_on(ip, &connection).expect("known");
        assert_eq!(role(&after).as_deref(), Some("app-b"));
        // Gone: not served from what the connection kept.
        let _ = w.apply(crate::index::Change::Remove {
            id: format!("{:0<64}", "b"),
        });
        assert!(id.resolve_now_on(ip, &connection).is_none());
    }

    #[tokio::test]
    async fn a_new_incarnation_on_the_same_address_is_a_new_workload() {
        let (id, mut w) = with_index(None, ContainerRules::default());
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "a",
            "172.18.0.2",
            &[("IAM_ROLE", "role-a")],
            &[],
        )));
        let first = id.resolve("172.18.0.2".parse().expect("ip")).await;
        let _ = w.apply(crate::index::Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "b",
            "172.18.0.2",
            &[("IAM_ROLE", "role-b")],
            &[],
        )));
        let second = id.resolve("172.18.0.2".parse().expect("ip")).await;
        assert_ne!(first.binding.as_str(), second.binding.as_str());
        assert_eq!(
            second.role.assignment().expect("role").role_name(),
            "role-b"
        );
    }

    #[tokio::test]
    async fn refusals_and_bad_policies_are_not_sent_to_sts() {
        let rules = ContainerRules {
            allowed_roles: vec!["app-*".into()],
            ..ContainerRules::default()
        };
        let (id, mut w) = with_index(Some("fallback"), rules);
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "a",
            "172.18.0.2",
            &[("IAM_ROLE", "admin")],
            &[],
        )));
        let _ = w.apply(crate::index::Change::Upsert(ctr(
            "b",
            "172.18.0.3",
            &[("IAM_ROLE", "app-b"), ("IAM_POLICY", "{not json")],
            &[],
        )));
        let a = id.resolve("172.18.0.2".parse().expect("ip")).await;
        assert!(
            matches!(&a.role, RoleState::Refused(r) if r.code == "AccessDenied" && r.name == "admin"),
            "{:?}",
            a.role
        );
        let b = id.resolve("172.18.0.3".parse().expect("ip")).await;
        assert!(
            matches!(&b.role, RoleState::Refused(r) if r.code == "MalformedPolicyDocument"),
            "{:?}",
            b.role
        );
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_first_sync_roles_are_pending_except_on_loopback() {
        let mut id = identity(Some("fallback"), "{}");
        let (index, _writer) = crate::index::index();
        id.attach_index(index);
        let w = id.resolve("172.18.0.2".parse().expect("ip")).await;
        assert!(matches!(w.role, RoleState::Pending));
        let local = id.resolve("127.0.0.1".parse().expect("ip")).await;
        assert!(local.role.assignment().is_some());
    }

    #[test]
    fn templates_are_checked_and_rendered() {
        assert!(check_session_name_template("imdsd-{ip}").is_ok());
        assert!(check_session_name_template("{nope}").is_err());
        assert!(check_session_name_template("a{ip").is_err());
        assert!(check_session_name_template("a}").is_err());
        assert_eq!(
            render_session_name("x-{ip}", "fd00::1".parse().expect("ip"), None),
            "x-fd00--1"
        );
    }
}
