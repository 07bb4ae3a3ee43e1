//! The role mapping file (`--role-mapping-file`, `ROLE_MAPPING_FILE`): a JSON object from caller IP
//! or CIDR to a role, for callers that are not containers (VMs, hosts, containers on networks the
//! daemon cannot see).
//!
//! It reads lyft/metadataproxy's files unchanged — `{"10.0.0.5": "app@123456789012"}` or
//! `{"10.0.0.5": {"name": "app", "account_id": "…", "external_id": "…", "session_name": "…"}}` — and
//! adds CIDR keys and a `role` field that takes any role spec. The most specific match wins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

use super::role::{RoleSpec, is_session_name};

/// One mapped role and the AssumeRole inputs that came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRole {
    pub spec: RoleSpec,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
}

/// The parsed file: exact addresses first, then networks from the longest prefix down.
#[derive(Debug, Clone, Default)]
pub struct RoleMapping {
    exact: HashMap<IpAddr, (String, MappedRole)>,
    networks: Vec<(IpNet, String, MappedRole)>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawValue {
    Spec(String),
    Detailed(RawDetailed),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetailed {
    role: Option<String>,
    name: Option<String>,
    account_id: Option<String>,
    external_id: Option<String>,
    session_name: Option<String>,
}

impl RoleMapping {
    /// Reads and validates the file; every problem is reported, each naming its key.
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read the role mapping file: {e}")])?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        let raw: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).map_err(|e| {
            vec![format!(
                "is not a JSON object of IP or CIDR to role, such as {{\"10.0.0.5\": \"app@123456789012\"}}: {e}"
            )]
        })?;
        let mut mapping = RoleMapping::default();
        let mut problems = Vec::new();
        for (key, value) in raw {
            match parse_entry(&key, value) {
                Ok((Target::Address(ip), role)) => {
                    mapping.exact.insert(ip, (key, role));
                }
                Ok((Target::Network(net), role)) => mapping.networks.push((net, key, role)),
                Err(message) => problems.push(format!("key {key:?}: {message}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        mapping
            .networks
            .sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix_len()));
        Ok(mapping)
    }

    /// The entry for `ip` and the key it was found under.
    pub fn lookup(&self, ip: IpAddr) -> Option<(&str, &MappedRole)> {
        if let Some((key, role)) = self.exact.get(&ip) {
            return Some((key, role));
        }
        self.networks
            .iter()
            .find(|(net, _, _)| net.contains(&ip))
            .map(|(_, key, role)| (key.as_str(), role))
    }

    /// Every mapped role, for validation and prefetching.
    pub fn roles(&self) -> impl Iterator<Item = (&str, &MappedRole)> {
        self.exact
            .values()
            .map(|(k, r)| (k.as_str(), r))
            .chain(self.networks.iter().map(|(_, k, r)| (k.as_str(), r)))
    }

    /// Exact-address entries, whose workloads are known in advance.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.exact.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.networks.is_empty()
    }
}

enum Target {
    Address(IpAddr),
    Network(IpNet),
}

fn parse_entry(key: &str, value: serde_json::Value) -> Result<(Target, MappedRole), String> {
    let target = if let Ok(ip) = key.parse::<IpAddr>() {
        Target::Address(ip)
    } else if let Ok(net) = key.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "has host bits set; write the network as {}",
                net.trunc()
            ));
        }
        Target::Network(net)
    } else {
        return Err("is not an IP address or CIDR block such as \"10.0.0.0/24\"".into());
    };
    let raw: RawValue = serde_json::from_value(value).map_err(|_| {
        "must be a role string or an object with \"role\" (or \"name\" and \"account_id\"), \
         \"external_id\" and \"session_name\""
            .to_string()
    })?;
    let role = match raw {
        RawValue::Spec(spec) => MappedRole {
            spec: RoleSpec::parse(&spec).map_err(|e| e.0)?,
            external_id: None,
            session_name: None,
        },
        RawValue::Detailed(d) => {
            let spec_text = match (d.role, d.name, d.account_id) {
                (Some(role), None, None) => role,
                (None, Some(name), None) => name,
                (None, Some(name), Some(account)) => format!("{name}@{account}"),
                (Some(_), _, _) => {
                    return Err(
                        "give either \"role\" or \"name\" (with \"account_id\"), not both".into(),
                    );
                }
                (None, None, _) => return Err("names no role: add \"role\"".into()),
            };
            if let Some(session) = &d.session_name
                && !is_session_name(session)
            {
                return Err(format!(
                    "session_name {session:?} must be 2 to 64 characters of letters, digits and _+=,.@-"
                ));
            }
            if let Some(ext) = &d.external_id
                && !(2..=1224).contains(&ext.len())
            {
                return Err("external_id must be 2 to 1224 characters".into());
            }
            MappedRole {
                spec: RoleSpec::parse(&spec_text).map_err(|e| e.0)?,
                external_id: d.external_id,
                session_name: d.session_name,
            }
        }
    };
    Ok((target, role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lyft_files_unchanged() {
        let m = RoleMapping::parse(
            r#"{
                "172.17.0.2": "app@123456789012",
                "172.17.0.3": {"name": "db", "account_id": "210987654321", "external_id": "xyz-123", "session_name": "db-session"}
            }"#,
        )
        .expect("valid");
        let (_, a) = m.lookup("172.17.0.2".parse().expect("ip")).expect("mapped");
        assert_eq!(a.spec.name(), "app");
        let (_, b) = m.lookup("172.17.0.3".parse().expect("ip")).expect("mapped");
        assert_eq!(b.external_id.as_deref(), Some("xyz-123"));
        assert_eq!(b.session_name.as_deref(), Some("db-session"));
        assert!(m.lookup("172.17.0.4".parse().expect("ip")).is_none());
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let m = RoleMapping::parse(
            r#"{"10.0.0.0/8": "wide", "10.1.0.0/16": "narrow", "10.1.2.3": "exact", "fd00::/64": "v6"}"#,
        )
        .expect("valid");
        let name = |ip: &str| {
            m.lookup(ip.parse().expect("ip"))
                .map(|(_, r)| r.spec.name().to_string())
        };
        assert_eq!(name("10.9.9.9").as_deref(), Some("wide"));
        assert_eq!(name("10.1.9.9").as_deref(), Some("narrow"));
        assert_eq!(name("10.1.2.3").as_deref(), Some("exact"));
        assert_eq!(name("fd00::7").as_deref(), Some("v6"));
        assert_eq!(name("192.168.0.1"), None);
    }

    #[test]
    fn every_bad_entry_is_reported_by_key() {
        let err = RoleMapping::parse(
            r#"{"not-an-ip": "app", "10.0.0.1/8": "app", "10.0.0.2": "bad role", "10.0.0.3": {"rol": "x"},
                "10.0.0.4": {"role": "app", "session_name": "a b"}}"#,
        )
        .expect_err("invalid");
        assert_eq!(err.len(), 5, "{err:?}");
        assert!(err.iter().any(|e| e.contains("\"not-an-ip\"")));
        assert!(
            err.iter()
                .any(|e| e.contains("write the network as 10.0.0.0/8"))
        );
        assert!(err.iter().any(|e| e.contains("session_name")));
        assert!(RoleMapping::parse("[1]").is_err());
    }
}
