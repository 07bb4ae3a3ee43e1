//! Role specs as operators and containers write them, and the role ARNs they resolve to.
//!
//! Accepted forms (the lyft/metadataproxy set, plus every partition):
//! - a full ARN in any partition: `arn:aws:iam::123456789012:role/app`, `arn:aws-cn:…`,
//!   `arn:aws-us-gov:…`, with or without a path (`role/team/app`);
//! - a bare `name` or `path/name`, in the default account;
//! - `name@123456789012`, in that account;
//! - `name@alias`, where `AWS_ACCOUNT_MAP` maps `alias` to an account id.
//!
//! Parsing is pure; the default account and the alias map come in through [`AccountContext`].

use std::collections::HashMap;
use std::fmt;

use thiserror::Error;

/// Why a role spec or session name was refused. The message names the value and the fix.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RoleSpecError(pub String);

/// A syntactically valid IAM role ARN.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn {
    partition: String,
    account: String,
    /// `/` or `/some/path/`, as IAM writes paths.
    path: String,
    name: String,
    /// The whole ARN, kept so that `as_str` costs nothing on the request path.
    full: String,
}

impl RoleArn {
    pub fn new(
        partition: &str,
        account: &str,
        path: &str,
        name: &str,
    ) -> Result<Self, RoleSpecError> {
        if !is_partition(partition) {
            return Err(RoleSpecError(format!(
                "{partition:?} is not an AWS partition (aws, aws-cn, aws-us-gov, …)"
            )));
        }
        if !is_account_id(account) {
            return Err(RoleSpecError(format!(
                "{account:?} is not a 12-digit AWS account id"
            )));
        }
        check_role_name(name)?;
        let path = normalise_path(path)?;
        let full = format!("arn:{partition}:iam::{account}:role{path}{name}");
        Ok(Self {
            partition: partition.to_string(),
            account: account.to_string(),
            path,
            name: name.to_string(),
            full,
        })
    }

    /// Parses `arn:<partition>:iam::<account>:role/<path/>name`.
    pub fn parse(s: &str) -> Result<Self, RoleSpecError> {
        let bad = || {
            RoleSpecError(format!(
                "{s:?} is not an IAM role ARN such as \"arn:aws:iam::123456789012:role/my-role\""
            ))
        };
        let mut parts = s.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let rest = resource.strip_prefix("role/").ok_or_else(bad)?;
        let (path, name) = match rest.rfind('/') {
            Some(i) => (&rest[..=i], &rest[i + 1..]),
            None => ("", rest),
        };
        Self::new(partition, account, path, name)
            .map_err(|e| RoleSpecError(format!("{s:?}: {}", e.0)))
    }

    /// The role's name: what IMDS lists under `iam/security-credentials/`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn partition(&self) -> &str {
        &self.partition
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// Where a role spec without an account finds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountRef {
    /// `name`: `DEFAULT_ACCOUNT_ID`, else the source identity's account.
    Default,
    /// `name@123456789012`.
    Id(String),
    /// `name@alias`, looked up in `AWS_ACCOUNT_MAP`.
    Alias(String),
}

/// A role as written, before the account is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleSpec {
    Arn(RoleArn),
    Name {
        path: String,
        name: String,
        account: AccountRef,
    },
}

/// What resolving a name-only spec needs.
#[derive(Debug, Clone, Default)]
pub struct AccountContext {
    /// `DEFAULT_ACCOUNT_ID`, else the account of the daemon's own identity.
    pub default_account: Option<String>,
    /// The partition of the daemon's own identity (`aws` unless it says otherwise).
    pub partition: String,
    /// `AWS_ACCOUNT_MAP`: alias → account id.
    pub aliases: HashMap<String, String>,
}

impl RoleSpec {
    pub fn parse(s: &str) -> Result<Self, RoleSpecError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(RoleSpecError("the role is empty".into()));
        }
        if s.starts_with("arn:") {
            return RoleArn::parse(s).map(RoleSpec::Arn);
        }
        // The account suffix follows the last '@'; role names may contain '@' themselves, and such
        // roles can always be named by ARN.
        let (role, account) = match s.rsplit_once('@') {
            Some((role, acct)) if is_account_id(acct) => (role, AccountRef::Id(acct.to_string())),
            Some((role, alias)) if !alias.is_empty() && !role.is_empty() => {
                (role, AccountRef::Alias(alias.to_string()))
            }
            Some(_) => {
                return Err(RoleSpecError(format!(
                    "{s:?} is not a role: write name, path/name, name@123456789012, name@alias or an ARN"
                )));
            }
            None => (s, AccountRef::Default),
        };
        let role = role.trim_start_matches('/');
        let (path, name) = match role.rfind('/') {
            Some(i) => (&role[..=i], &role[i + 1..]),
            None => ("", role),
        };
        check_role_name(name).map_err(|e| RoleSpecError(format!("{s:?}: {}", e.0)))?;
        let path = normalise_path(path).map_err(|e| RoleSpecError(format!("{s:?}: {}", e.0)))?;
        Ok(RoleSpec::Name {
            path,
            name: name.to_string(),
            account,
        })
    }

    /// The role name, known before the account is.
    pub fn name(&self) -> &str {
        match self {
            RoleSpec::Arn(arn) => arn.name(),
            RoleSpec::Name { name, .. } => name,
        }
    }

    pub fn resolve(&self, ctx: &AccountContext) -> Result<RoleArn, RoleSpecError> {
        let (path, name, account) = match self {
            RoleSpec::Arn(arn) => return Ok(arn.clone()),
            RoleSpec::Name {
                path,
                name,
                account,
            } => (path, name, account),
        };
        let account = match account {
            AccountRef::Id(id) => id.clone(),
            AccountRef::Alias(alias) => ctx.aliases.get(alias).cloned().ok_or_else(|| {
                RoleSpecError(format!(
                    "{name}@{alias}: the account alias {alias:?} is not in AWS_ACCOUNT_MAP; add it \
                     (e.g. AWS_ACCOUNT_MAP='{{\"{alias}\": \"123456789012\"}}') or use the account id"
                ))
            })?,
            AccountRef::Default => ctx.default_account.clone().ok_or_else(|| {
                RoleSpecError(format!(
                    "{name:?} names no account and none is known: set DEFAULT_ACCOUNT_ID or use \
                     {name}@123456789012 or a full ARN"
                ))
            })?,
        };
        let partition = if ctx.partition.is_empty() {
            "aws"
        } else {
            &ctx.partition
        };
        RoleArn::new(partition, &account, path, name)
    }
}

/// Parses `AWS_ACCOUNT_MAP`: a JSON object of alias → 12-digit account id.
pub fn parse_account_map(json: &str) -> Result<HashMap<String, String>, RoleSpecError> {
    let map: HashMap<String, serde_json::Value> = serde_json::from_str(json).map_err(|e| {
        RoleSpecError(format!(
            "is not a JSON object of alias to account id such as {{\"prod\": \"123456789012\"}}: {e}"
        ))
    })?;
    let mut out = HashMap::with_capacity(map.len());
    for (alias, value) in map {
        // lyft's settings accept numbers too; an account id is 12 digits either way.
        let id = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => format!("{n:0>12}"),
            other => {
                return Err(RoleSpecError(format!(
                    "alias {alias:?} maps to {other}, not an account id"
                )));
            }
        };
        if !is_account_id(&id) {
            return Err(RoleSpecError(format!(
                "alias {alias:?} maps to {id:?}, not a 12-digit account id"
            )));
        }
        out.insert(alias, id);
    }
    Ok(out)
}

/// Makes a valid `RoleSessionName` out of anything: characters outside `[\w+=,.@-]` become `-`,
/// the result is cut to 64 characters, and a result shorter than 2 characters is replaced by
/// `fallback` (which must itself be valid).
pub fn sanitise_session_name(raw: &str, fallback: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    // Container names start with '/' in the Docker API; a leading dash helps nobody.
    while out.starts_with('-') && out.len() > 2 {
        out.remove(0);
    }
    if out.len() < 2 {
        fallback.to_string()
    } else {
        out
    }
}

/// True for a string that STS accepts as `RoleSessionName` or `SourceIdentity`.
pub fn is_session_name(s: &str) -> bool {
    (2..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_partition(s: &str) -> bool {
    s == "aws"
        || s.strip_prefix("aws-").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        })
}

fn check_role_name(name: &str) -> Result<(), RoleSpecError> {
    if name.is_empty() || name.len() > 64 {
        return Err(RoleSpecError(format!(
            "the role name {name:?} must be 1 to 64 characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c)))
    {
        return Err(RoleSpecError(format!(
            "the role name {name:?} contains {c:?}; IAM role names use letters, digits and _+=,.@-"
        )));
    }
    Ok(())
}

/// `""` → `/`; `team/` → `/team/`; refuses characters IAM does not allow in paths.
fn normalise_path(path: &str) -> Result<String, RoleSpecError> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok("/".into());
    }
    if trimmed.split('/').any(str::is_empty)
        || trimmed
            .chars()
            .any(|c| !(c.is_ascii_graphic()) || c == '*' || c == '?')
        || trimmed.len() > 510
    {
        return Err(RoleSpecError(format!(
            "the role path {path:?} is not a valid IAM path such as \"team/app/\""
        )));
    }
    Ok(format!("/{trimmed}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> AccountContext {
        AccountContext {
            default_account: Some("111111111111".into()),
            partition: "aws".into(),
            aliases: [("prod".to_string(), "222222222222".to_string())].into(),
        }
    }

    fn arn(spec: &str) -> String {
        RoleSpec::parse(spec)
            .and_then(|s| s.resolve(&ctx()))
            .map(|a| a.to_string())
            .unwrap_or_else(|e| format!("error: {e}"))
    }

    #[test]
    fn every_spec_form_resolves() {
        assert_eq!(arn("app"), "arn:aws:iam::111111111111:role/app");
        assert_eq!(arn("team/app"), "arn:aws:iam::111111111111:role/team/app");
        assert_eq!(
            arn("app@333333333333"),
            "arn:aws:iam::333333333333:role/app"
        );
        assert_eq!(arn("app@prod"), "arn:aws:iam::222222222222:role/app");
        assert_eq!(
            arn("team/app@prod"),
            "arn:aws:iam::222222222222:role/team/app"
        );
        assert_eq!(
            arn("arn:aws-cn:iam::444444444444:role/x/y/app"),
            "arn:aws-cn:iam::444444444444:role/x/y/app"
        );
        assert_eq!(
            arn("arn:aws-us-gov:iam::444444444444:role/app"),
            "arn:aws-us-gov:iam::444444444444:role/app"
        );
    }

    #[test]
    fn the_arn_parts_are_kept() {
        let a = RoleArn::parse("arn:aws:iam::444444444444:role/x/y/app").expect("valid");
        assert_eq!(
            (a.partition(), a.account(), a.path(), a.name()),
            ("aws", "444444444444", "/x/y/", "app")
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(arn("").contains("empty"));
        assert!(arn("app@nowhere").contains("AWS_ACCOUNT_MAP"));
        assert!(arn("has space").contains("contains ' '"));
        assert!(arn("arn:aws:iam::12:role/app").contains("12-digit"));
        assert!(arn("arn:aws:s3:::bucket").contains("not an IAM role ARN"));
        assert!(arn("arn:aws:iam::444444444444:user/bob").contains("not an IAM role ARN"));
        assert!(arn("app@").contains("is not a role"));
        assert!(arn(&"x".repeat(65)).contains("1 to 64"));
        let no_default = AccountContext::default();
        let err = RoleSpec::parse("app")
            .and_then(|s| s.resolve(&no_default))
            .expect_err("no account");
        assert!(err.0.contains("DEFAULT_ACCOUNT_ID"));
    }

    #[test]
    fn account_map_accepts_strings_and_numbers() {
        let m = parse_account_map(r#"{"a": "123456789012", "b": 210987654321}"#).expect("valid");
        assert_eq!(m["b"], "210987654321");
        assert!(parse_account_map(r#"{"a": "12"}"#).is_err());
        assert!(parse_account_map("[]").is_err());
    }

    #[test]
    fn session_names_are_sanitised_to_what_sts_accepts() {
        assert_eq!(sanitise_session_name("/my app:1", "imdsd"), "my-app-1");
        assert_eq!(sanitise_session_name("", "imdsd"), "imdsd");
        assert_eq!(sanitise_session_name("x", "imdsd"), "imdsd");
        let long = sanitise_session_name(&"a".repeat(100), "imdsd");
        assert_eq!(long.len(), 64);
        for raw in [
            "/web_1",
            "ünïcode",
            "a b c",
            "fe80::1",
            "x".repeat(70).as_str(),
        ] {
            assert!(
                is_session_name(&sanitise_session_name(raw, "imdsd")),
                "{raw}"
            );
        }
    }
}
