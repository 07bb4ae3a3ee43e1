//! Which role a container asked for, and whether it may have it.
//!
//! A container names its role in its own configuration, first match wins:
//! 1. the label `<prefix>.role-alias` (or ec2metaproxy's `ec2metaproxy.RoleAlias`): an alias from
//!    the operator's `[role_aliases]` table;
//! 2. the label `<prefix>.role`;
//! 3. the environment variable `IAM_ROLE` (the name is configurable), as lyft/metadataproxy reads it.
//!
//! A role named by label or environment is a role spec (ARN, name, `name@account`, `name@alias`),
//! unless the operator chose "aliases only", in which case it must be an alias. A role the
//! container chose must also match the operator's allow-list; aliases are the operator's own and
//! always allowed. A container cannot widen what it gets: anything refused here is answered with
//! an error document and no STS call.
//!
//! The container may also give an external id (`<prefix>.external-id`, `IAM_EXTERNAL_ID`), a
//! session policy that narrows the role (`<prefix>.policy`, `ec2metaproxy.Policy`, `IAM_POLICY`),
//! and its session name through `ROLE_SESSION_KEY` (`Env:KEY` or `Labels:KEY`).

use std::collections::BTreeMap;
use std::time::Duration;

use wildmatch::WildMatch;

use super::role::{AccountContext, RoleArn, RoleSpec};
use crate::index::Container;

/// Where a container's session name comes from (`ROLE_SESSION_KEY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKey {
    /// `Env:KEY`: the container's environment variable `KEY`.
    Env(String),
    /// `Labels:KEY`: the container's label `KEY`.
    Label(String),
}

impl SessionKey {
    /// Parses lyft/metadataproxy's `Env:KEY` / `Labels:KEY`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (kind, key) = s.split_once(':').ok_or_else(|| {
            format!("{s:?} must be Env:KEY or Labels:KEY, e.g. \"Labels:com.example.job-id\"")
        })?;
        if key.is_empty() {
            return Err(format!("{s:?} names no key after the colon"));
        }
        match kind {
            "Env" | "env" => Ok(SessionKey::Env(key.to_string())),
            "Labels" | "labels" | "Label" | "label" => Ok(SessionKey::Label(key.to_string())),
            _ => Err(format!(
                "{s:?} must start with Env: or Labels:, e.g. \"Env:CI_JOB_ID\""
            )),
        }
    }
}

/// The operator's rules for containers.
#[derive(Debug, Clone)]
pub struct ContainerRules {
    /// The environment variable holding a container's role (lyft's `IAM_ROLE`).
    pub role_env: String,
    /// Labels are `<prefix>.role`, `<prefix>.role-alias`, …
    pub label_prefix: String,
    /// Alias → role, chosen by the `<prefix>.role-alias` label.
    pub aliases: BTreeMap<String, RoleSpec>,
    /// Globs a container-chosen role must match: `arn:…` patterns match the ARN, others the role's
    /// name or path/name. Empty allows any role.
    pub allowed_roles: Vec<String>,
    /// Containers may only pick aliases.
    pub aliases_only: bool,
    pub session_key: Option<SessionKey>,
    /// How long a caller from an unknown container address waits for the index.
    pub unknown_caller_wait: Duration,
}

/// `IAM_EXTERNAL_ID`, as lyft/metadataproxy reads it.
pub const EXTERNAL_ID_ENV: &str = "IAM_EXTERNAL_ID";
/// `IAM_POLICY`, as ec2metaproxy reads it.
pub const POLICY_ENV: &str = "IAM_POLICY";
/// ec2metaproxy's labels, read for compatibility.
const COMPAT_ALIAS_LABEL: &str = "ec2metaproxy.RoleAlias";
const COMPAT_POLICY_LABEL: &str = "ec2metaproxy.Policy";

/// The SDKs' and issue's bound on waiting for a new container's event.
pub const DEFAULT_UNKNOWN_CALLER_WAIT: Duration = Duration::from_millis(250);

impl Default for ContainerRules {
    fn default() -> Self {
        Self {
            role_env: "IAM_ROLE".into(),
            label_prefix: "imdsd".into(),
            aliases: BTreeMap::new(),
            allowed_roles: Vec::new(),
            aliases_only: false,
            session_key: None,
            unknown_caller_wait: DEFAULT_UNKNOWN_CALLER_WAIT,
        }
    }
}

impl ContainerRules {
    /// The environment variables the watcher must keep from each container (it keeps no others,
    /// so that unrelated secrets in container environments never sit in imdsd's memory).
    pub fn env_keys(&self) -> Vec<String> {
        let mut keys = vec![
            self.role_env.clone(),
            EXTERNAL_ID_ENV.to_string(),
            POLICY_ENV.to_string(),
        ];
        if let Some(SessionKey::Env(k)) = &self.session_key {
            keys.push(k.clone());
        }
        keys.dedup();
        keys
    }

    /// The labels the watcher must keep from each container: the ones this module reads. The
    /// rest (compose adds ten or so, some of them long paths) would only take memory, about a
    /// kilobyte per container.
    pub fn label_keys(&self) -> Vec<String> {
        let mut keys = vec![
            self.label("role-alias"),
            COMPAT_ALIAS_LABEL.to_string(),
            self.label("role"),
            self.label("external-id"),
            self.label("policy"),
            COMPAT_POLICY_LABEL.to_string(),
        ];
        if let Some(SessionKey::Label(k)) = &self.session_key {
            keys.push(k.clone());
        }
        keys.dedup();
        keys
    }

    fn label(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.label_prefix)
    }

    /// A glob that does not parse cannot exist (wildmatch accepts anything), so this only checks
    /// for patterns that can never match a role.
    pub fn check_allowed_pattern(pattern: &str) -> Result<(), String> {
        if pattern.trim().is_empty() {
            return Err("an empty pattern matches no role; remove it".into());
        }
        if pattern.starts_with("arn:") && !pattern.contains(":role/") && !pattern.contains('*') {
            return Err(format!(
                "{pattern:?} is an ARN pattern without \":role/\"; write e.g. \"arn:aws:iam::123456789012:role/app-*\""
            ));
        }
        Ok(())
    }

    /// True when a container may have `arn`.
    pub fn allows(&self, arn: &RoleArn) -> bool {
        if self.allowed_roles.is_empty() {
            return true;
        }
        let path_name = format!("{}{}", arn.path().trim_start_matches('/'), arn.name());
        self.allowed_roles.iter().any(|p| {
            let glob = WildMatch::new(p);
            if p.starts_with("arn:") {
                glob.matches(arn.as_str())
            } else {
                glob.matches(arn.name()) || glob.matches(&path_name)
            }
        })
    }
}

/// A container's own request, before the operator's fallbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// As written by the container.
    pub value: String,
    /// Which label or variable it came from.
    pub from: RequestSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestSource {
    AliasLabel(String),
    RoleLabel(String),
    Env(String),
}

impl RequestSource {
    pub fn describe(&self) -> String {
        match self {
            RequestSource::AliasLabel(k) | RequestSource::RoleLabel(k) => format!("label {k}"),
            RequestSource::Env(k) => format!("environment variable {k}"),
        }
    }
}

/// The outcome of checking a container's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The role to assume; `alias` is set when it came from the alias table.
    Grant { arn: RoleArn, alias: Option<String> },
    /// Refused: EC2-style error code and a message that says what to change.
    Refuse { code: &'static str, message: String },
}

/// What a container asks for.
pub fn requested(rules: &ContainerRules, c: &Container) -> Option<Requested> {
    let non_empty = |v: Option<&String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let alias_label = rules.label("role-alias");
    if let Some(v) = non_empty(c.labels.get(&alias_label)) {
        return Some(Requested {
            value: v,
            from: RequestSource::AliasLabel(alias_label),
        });
    }
    if let Some(v) = non_empty(c.labels.get(COMPAT_ALIAS_LABEL)) {
        return Some(Requested {
            value: v,
            from: RequestSource::AliasLabel(COMPAT_ALIAS_LABEL.into()),
        });
    }
    let role_label = rules.label("role");
    if let Some(v) = non_empty(c.labels.get(&role_label)) {
        return Some(Requested {
            value: v,
            from: RequestSource::RoleLabel(role_label),
        });
    }
    non_empty(c.env.get(&rules.role_env)).map(|v| Requested {
        value: v,
        from: RequestSource::Env(rules.role_env.clone()),
    })
}

/// Decides a container's request against the operator's rules. `aliases` are the resolved alias
/// table.
pub fn decide(
    rules: &ContainerRules,
    aliases: &BTreeMap<String, RoleArn>,
    accounts: &AccountContext,
    req: &Requested,
) -> Decision {
    let by_alias = matches!(req.from, RequestSource::AliasLabel(_)) || rules.aliases_only;
    if by_alias {
        return match aliases.get(&req.value) {
            Some(arn) => Decision::Grant {
                arn: arn.clone(),
                alias: Some(req.value.clone()),
            },
            None => Decision::Refuse {
                code: "AccessDenied",
                message: format!(
                    "the {} names the role alias {:?}, which imdsd's role_aliases table does not define{}",
                    req.from.describe(),
                    req.value,
                    if rules.aliases_only && !matches!(req.from, RequestSource::AliasLabel(_)) {
                        " (only aliases are allowed here)"
                    } else {
                        ""
                    }
                ),
            },
        };
    }
    let arn = match RoleSpec::parse(&req.value).and_then(|spec| spec.resolve(accounts)) {
        Ok(arn) => arn,
        Err(e) => {
            return Decision::Refuse {
                code: "InvalidRoleSpec",
                message: format!("the {} is not a usable role: {e}", req.from.describe()),
            };
        }
    };
    if !rules.allows(&arn) {
        return Decision::Refuse {
            code: "AccessDenied",
            message: format!(
                "the role {arn} (from the {}) is not among the roles imdsd allows containers to use",
                req.from.describe()
            ),
        };
    }
    Decision::Grant { arn, alias: None }
}

/// The container's external id, if it gave one.
pub fn external_id(rules: &ContainerRules, c: &Container) -> Option<String> {
    c.labels
        .get(&rules.label("external-id"))
        .or_else(|| c.env.get(EXTERNAL_ID_ENV))
        .filter(|s| !s.is_empty())
        .cloned()
}

/// The container's session policy, if it gave one.
pub fn policy(rules: &ContainerRules, c: &Container) -> Option<String> {
    c.labels
        .get(&rules.label("policy"))
        .or_else(|| c.labels.get(COMPAT_POLICY_LABEL))
        .or_else(|| c.env.get(POLICY_ENV))
        .filter(|s| !s.trim().is_empty())
        .cloned()
}

/// The session name the container chose through `ROLE_SESSION_KEY`, unsanitised.
pub fn session_key_value(rules: &ContainerRules, c: &Container) -> Option<String> {
    match rules.session_key.as_ref()? {
        SessionKey::Env(k) => c.env.get(k),
        SessionKey::Label(k) => c.labels.get(k),
    }
    .filter(|s| !s.is_empty())
    .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn accounts() -> AccountContext {
        AccountContext {
            default_account: Some("123456789012".into()),
            partition: "aws".into(),
            aliases: HashMap::new(),
        }
    }

    fn container(labels: &[(&str, &str)], env: &[(&str, &str)]) -> Container {
        Container {
            id: "c".repeat(64),
            name: "web".into(),
            started_at: "t".into(),
            image: "img".into(),
            addresses: vec![],
            networks: vec![],
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

    fn aliases() -> BTreeMap<String, RoleArn> {
        [(
            "db".to_string(),
            RoleArn::parse("arn:aws:iam::210987654321:role/MysqlReplica").expect("arn"),
        )]
        .into()
    }

    fn decide_for(rules: &ContainerRules, c: &Container) -> Option<Decision> {
        requested(rules, c).map(|r| decide(rules, &aliases(), &accounts(), &r))
    }

    #[test]
    fn every_label_read_here_is_kept_by_the_watcher_and_nothing_else() {
        let rules = ContainerRules {
            label_prefix: "com.example.iam".into(),
            session_key: Some(SessionKey::Label("team.job".into())),
            ..ContainerRules::default()
        };
        let keys = rules.label_keys();
        for label in [
            "com.example.iam.role-alias",
            "com.example.iam.role",
            "com.example.iam.external-id",
            "com.example.iam.policy",
            COMPAT_ALIAS_LABEL,
            COMPAT_POLICY_LABEL,
            "team.job",
        ] {
            assert!(keys.iter().any(|k| k == label), "{label} is dropped");
        }
        assert!(!keys.iter().any(|k| k.starts_with("com.docker.compose")));
        let all = container(
            &[
                ("com.example.iam.role", "app"),
                ("com.example.iam.external-id", "x-1"),
                ("com.example.iam.policy", "{}"),
                ("team.job", "nightly"),
                ("com.docker.compose.service", "web"),
            ],
            &[],
        );
        let mut filtered = all.clone();
        filtered.labels.retain(|k, _| keys.contains(k));
        assert_eq!(filtered.labels.len(), 4);
        assert_eq!(requested(&rules, &filtered), requested(&rules, &all));
        assert_eq!(external_id(&rules, &filtered), Some("x-1".into()));
        assert_eq!(policy(&rules, &filtered), Some("{}".into()));
        assert_eq!(session_key_value(&rules, &filtered), Some("nightly".into()));
    }

    #[test]
    fn alias_label_beats_role_label_beats_environment() {
        let rules = ContainerRules::default();
        let c = container(
            &[("imdsd.role-alias", "db"), ("imdsd.role", "from-label")],
            &[("IAM_ROLE", "from-env")],
        );
        assert!(
            matches!(decide_for(&rules, &c), Some(Decision::Grant { alias: Some(a), .. }) if a == "db")
        );
        let c = container(&[("imdsd.role", "from-label")], &[("IAM_ROLE", "from-env")]);
        assert!(
            matches!(decide_for(&rules, &c), Some(Decision::Grant { arn, .. }) if arn.name() == "from-label")
        );
        let c = container(&[], &[("IAM_ROLE", "from-env@210987654321")]);
        assert!(
            matches!(decide_for(&rules, &c), Some(Decision::Grant { arn, .. })
            if arn.as_str() == "arn:aws:iam::210987654321:role/from-env")
        );
        let c = container(&[("ec2metaproxy.RoleAlias", "db")], &[]);
        assert!(matches!(
            decide_for(&rules, &c),
            Some(Decision::Grant { alias: Some(_), .. })
        ));
        assert!(decide_for(&rules, &container(&[], &[("IAM_ROLE", " ")])).is_none());
    }

    #[test]
    fn the_allow_list_cannot_be_escaped() {
        let rules = ContainerRules {
            allowed_roles: vec![
                "app-*".into(),
                "arn:aws:iam::210987654321:role/team/*".into(),
            ],
            ..ContainerRules::default()
        };
        let ok = |v: &str| {
            matches!(
                decide_for(&rules, &container(&[], &[("IAM_ROLE", v)])),
                Some(Decision::Grant { .. })
            )
        };
        assert!(ok("app-web"));
        assert!(ok("arn:aws:iam::210987654321:role/team/anything"));
        assert!(!ok("admin"));
        assert!(!ok("arn:aws:iam::123456789012:role/team/anything"));
        assert!(!ok("arn:aws:iam::123456789012:role/admin"));
        // An alias is the operator's own choice and is not subject to the glob list.
        let c = container(&[("imdsd.role-alias", "db")], &[]);
        assert!(matches!(
            decide_for(&rules, &c),
            Some(Decision::Grant { .. })
        ));
        let refused = decide_for(&rules, &container(&[], &[("IAM_ROLE", "admin")]));
        assert!(
            matches!(refused, Some(Decision::Refuse { code: "AccessDenied", message })
            if message.contains("arn:aws:iam::123456789012:role/admin") && message.contains("IAM_ROLE"))
        );
    }

    #[test]
    fn aliases_only_turns_every_request_into_an_alias_lookup() {
        let rules = ContainerRules {
            aliases_only: true,
            ..ContainerRules::default()
        };
        assert!(matches!(
            decide_for(&rules, &container(&[], &[("IAM_ROLE", "db")])),
            Some(Decision::Grant { alias: Some(_), .. })
        ));
        assert!(matches!(
            decide_for(
                &rules,
                &container(&[], &[("IAM_ROLE", "arn:aws:iam::123456789012:role/admin")])
            ),
            Some(Decision::Refuse {
                code: "AccessDenied",
                ..
            })
        ));
    }

    #[test]
    fn bad_specs_are_refused_not_guessed() {
        let rules = ContainerRules::default();
        let d = decide_for(&rules, &container(&[], &[("IAM_ROLE", "x@nowhere")]));
        assert!(
            matches!(
                d,
                Some(Decision::Refuse {
                    code: "InvalidRoleSpec",
                    ..
                })
            ),
            "{d:?}"
        );
        let d = decide_for(&rules, &container(&[("imdsd.role-alias", "nope")], &[]));
        assert!(
            matches!(
                d,
                Some(Decision::Refuse {
                    code: "AccessDenied",
                    ..
                })
            ),
            "{d:?}"
        );
    }

    #[test]
    fn extras_come_from_labels_then_environment() {
        let rules = ContainerRules {
            session_key: Some(SessionKey::parse("Labels:ci.job").expect("key")),
            ..ContainerRules::default()
        };
        let c = container(
            &[("imdsd.external-id", "lbl-ext"), ("ci.job", "job-42")],
            &[
                ("IAM_EXTERNAL_ID", "env-ext"),
                ("IAM_POLICY", "{\"Version\":\"2012-10-17\"}"),
            ],
        );
        assert_eq!(external_id(&rules, &c).as_deref(), Some("lbl-ext"));
        assert_eq!(
            policy(&rules, &c).as_deref(),
            Some("{\"Version\":\"2012-10-17\"}")
        );
        assert_eq!(session_key_value(&rules, &c).as_deref(), Some("job-42"));
        assert!(SessionKey::parse("Env:JOB").is_ok());
        assert!(SessionKey::parse("JOB").is_err());
        assert!(SessionKey::parse("Files:JOB").is_err());
        assert!(rules.env_keys().contains(&"IAM_ROLE".to_string()));
    }
}
