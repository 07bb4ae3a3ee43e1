//! The emulated instance's identity: account, region, zone, ids, addresses, tags, user data.
//!
//! This module owns the `[instance]` table of the configuration file, its defaults and its
//! validation. The defaults agree with each other the way a real instance's values do (the zone
//! minus its letter is the region; the hostname is derived from the private IP and the region; the
//! private IP lies in the subnet, which lies in the VPC), because SDKs derive one from another:
//! botocore takes the region from the zone, Rust from `placement/region`, Go from the identity
//! document. It does no I/O except reading a user-data file.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use ipnet::Ipv4Net;
use serde::Deserialize;

/// Largest user data EC2 accepts (16 KiB, before base64).
pub const MAX_USER_DATA: usize = 16 * 1024;

/// The `[instance]` table of the configuration file, as written by the operator.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSection {
    pub account_id: Option<String>,
    pub region: Option<String>,
    pub availability_zone: Option<String>,
    pub availability_zone_id: Option<String>,
    pub instance_id: Option<String>,
    pub instance_type: Option<String>,
    pub ami_id: Option<String>,
    pub architecture: Option<String>,
    pub instance_life_cycle: Option<String>,
    pub launch_time: Option<String>,
    pub reservation_id: Option<String>,
    pub local_ipv4: Option<String>,
    pub local_hostname: Option<String>,
    pub public_ipv4: Option<String>,
    pub public_hostname: Option<String>,
    pub ipv6: Option<String>,
    pub mac: Option<String>,
    pub interface_id: Option<String>,
    pub subnet_id: Option<String>,
    pub subnet_ipv4_cidr_block: Option<String>,
    pub vpc_id: Option<String>,
    pub vpc_ipv4_cidr_block: Option<String>,
    pub security_groups: Option<Vec<SecurityGroupSection>>,
    pub tags: Option<BTreeMap<String, String>>,
    pub tags_in_metadata: Option<bool>,
    pub user_data: Option<String>,
    pub user_data_base64: Option<String>,
    pub user_data_file: Option<PathBuf>,
    pub public_keys: Option<Vec<PublicKeySection>>,
    pub instance_monitoring: Option<String>,
    pub spot_instance_action: Option<SpotActionSection>,
    pub rebalance_notice_time: Option<String>,
    pub autoscaling_target_lifecycle_state: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupSection {
    pub name: String,
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeySection {
    pub name: String,
    pub openssh_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpotActionSection {
    pub action: String,
    pub time: String,
}

/// A security group attached to the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityGroup {
    pub name: String,
    pub id: String,
}

/// A key pair published under `meta-data/public-keys/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    pub openssh_key: String,
}

/// A pending spot interruption (`meta-data/spot/instance-action`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotAction {
    pub action: String,
    pub time: SystemTime,
}

/// The validated identity of the emulated instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub account_id: String,
    pub region: String,
    pub partition: &'static str,
    pub domain: &'static str,
    pub availability_zone: String,
    pub availability_zone_id: String,
    pub instance_id: String,
    pub instance_type: String,
    pub ami_id: String,
    pub architecture: String,
    pub instance_life_cycle: String,
    pub launch_time: SystemTime,
    pub reservation_id: String,
    pub local_ipv4: Ipv4Addr,
    pub local_hostname: String,
    pub public_ipv4: Option<Ipv4Addr>,
    pub public_hostname: Option<String>,
    pub ipv6: Option<Ipv6Addr>,
    pub mac: String,
    pub interface_id: String,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    pub vpc_id: String,
    pub vpc_cidr: Ipv4Net,
    pub security_groups: Vec<SecurityGroup>,
    pub tags: BTreeMap<String, String>,
    pub tags_in_metadata: bool,
    pub user_data: Option<Bytes>,
    pub public_keys: Vec<PublicKey>,
    pub instance_monitoring: String,
    pub spot_action: Option<SpotAction>,
    pub rebalance_notice_time: Option<SystemTime>,
    pub autoscaling_target_lifecycle_state: Option<String>,
}

/// Values from outside the `[instance]` table that shape the defaults.
#[derive(Debug, Clone, Default)]
pub struct InstanceDefaults {
    /// The operator's region (`--region`, `AWS_REGION`, `AWS_DEFAULT_REGION`): containers should
    /// talk to the same region as the daemon unless the file says otherwise.
    pub region: Option<String>,
    /// `MOCKED_INSTANCE_ID` from lyft/metadataproxy: the instance id, with or without `i-`.
    pub mocked_instance_id: Option<String>,
    /// When the daemon started; the default launch time.
    pub started: Option<SystemTime>,
}

/// One problem found in the `[instance]` table: the key (dotted, relative to `instance`) and what is
/// wrong with it, including the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceProblem {
    pub key: String,
    pub message: String,
}

const DEFAULT_ACCOUNT: &str = "123456789012";
const DEFAULT_REGION: &str = "us-east-1";
const DEFAULT_INSTANCE_ID: &str = "i-0a7d3c9b1e5f24680";
const DEFAULT_INSTANCE_TYPE: &str = "t3.medium";
const DEFAULT_AMI: &str = "ami-0c02fb55956c7d316";
const DEFAULT_LOCAL_IPV4: Ipv4Addr = Ipv4Addr::new(172, 31, 24, 117);
const DEFAULT_MAC: &str = "0e:3a:5c:7e:91:b3";
const DEFAULT_ENI: &str = "eni-0b5e4c3a29d817f60";
const DEFAULT_SUBNET: &str = "subnet-0d4f7a1c3e9b58260";
const DEFAULT_VPC: &str = "vpc-0e1a9c4b7d3f25680";
const DEFAULT_SG_ID: &str = "sg-0f3b8d2a6c1e94570";
const DEFAULT_RESERVATION: &str = "r-0c9e2a7f4b1d35680";

impl Instance {
    /// Validates the table and fills in consistent defaults. Every problem is reported, not just
    /// the first.
    pub fn resolve(
        section: &InstanceSection,
        defaults: &InstanceDefaults,
    ) -> Result<Instance, Vec<InstanceProblem>> {
        let mut p = Problems::default();
        let s = section;

        let account_id = s
            .account_id
            .clone()
            .unwrap_or_else(|| DEFAULT_ACCOUNT.into());
        if !is_account_id(&account_id) {
            p.push(
                "account_id",
                format!("{account_id:?} is not a 12-digit AWS account id"),
            );
        }

        // The region comes from the file, then the zone, then the operator's region.
        let region = s
            .region
            .clone()
            .or_else(|| {
                s.availability_zone
                    .as_deref()
                    .filter(|az| az.len() > 1)
                    .map(|az| az[..az.len() - 1].to_string())
            })
            .or_else(|| defaults.region.clone())
            .unwrap_or_else(|| DEFAULT_REGION.into());
        if !is_region(&region) {
            p.push(
                "region",
                format!("{region:?} is not an AWS region name such as \"us-east-1\""),
            );
        }
        let (partition, domain) = partition_of(&region);

        let availability_zone = s
            .availability_zone
            .clone()
            .unwrap_or_else(|| format!("{region}a"));
        let zone_ok = availability_zone.len() == region.len() + 1
            && availability_zone.starts_with(region.as_str())
            && availability_zone
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_lowercase());
        if !zone_ok {
            p.push(
                "availability_zone",
                format!(
                    "{availability_zone:?} is not a zone of region {region:?}: SDKs derive the region by \
                     dropping the zone's last letter, so use \"{region}a\" (or another letter)"
                ),
            );
        }
        let availability_zone_id = s.availability_zone_id.clone().unwrap_or_else(|| {
            let letter = availability_zone.chars().last().unwrap_or('a');
            let index = (letter as u32).saturating_sub('a' as u32) + 1;
            format!("{}-az{index}", region_abbreviation(&region))
        });

        let instance_id = match (&s.instance_id, &defaults.mocked_instance_id) {
            (Some(id), _) => id.clone(),
            (None, Some(mocked)) if mocked.starts_with("i-") => mocked.clone(),
            (None, Some(mocked)) => format!("i-{mocked}"),
            (None, None) => DEFAULT_INSTANCE_ID.into(),
        };
        if !is_prefixed_id(&instance_id, "i-") {
            p.push(
                "instance_id",
                format!("{instance_id:?} is not an instance id such as \"{DEFAULT_INSTANCE_ID}\""),
            );
        }
        let instance_type = s
            .instance_type
            .clone()
            .unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.into());
        if !instance_type.contains('.') || instance_type.chars().any(char::is_whitespace) {
            p.push(
                "instance_type",
                format!("{instance_type:?} is not an instance type such as \"t3.medium\""),
            );
        }
        let ami_id = s.ami_id.clone().unwrap_or_else(|| DEFAULT_AMI.into());
        if !is_prefixed_id(&ami_id, "ami-") {
            p.push(
                "ami_id",
                format!("{ami_id:?} is not an AMI id such as \"{DEFAULT_AMI}\""),
            );
        }
        let architecture = s.architecture.clone().unwrap_or_else(|| {
            match std::env::consts::ARCH {
                "aarch64" => "arm64",
                "x86" => "i386",
                _ => "x86_64",
            }
            .into()
        });
        if !["x86_64", "arm64", "i386"].contains(&architecture.as_str()) {
            p.push(
                "architecture",
                format!("{architecture:?} must be one of \"x86_64\", \"arm64\", \"i386\""),
            );
        }
        let instance_life_cycle = s
            .instance_life_cycle
            .clone()
            .unwrap_or_else(|| "on-demand".into());
        if !["on-demand", "spot", "scheduled"].contains(&instance_life_cycle.as_str()) {
            p.push(
                "instance_life_cycle",
                format!(
                    "{instance_life_cycle:?} must be one of \"on-demand\", \"spot\", \"scheduled\""
                ),
            );
        }
        let started = defaults.started.unwrap_or_else(SystemTime::now);
        let launch_time = match &s.launch_time {
            Some(t) => p.time("launch_time", t).unwrap_or(started),
            None => crate::clock::floor_to_second(started),
        };
        let reservation_id = s
            .reservation_id
            .clone()
            .unwrap_or_else(|| DEFAULT_RESERVATION.into());
        if !is_prefixed_id(&reservation_id, "r-") {
            p.push(
                "reservation_id",
                format!(
                    "{reservation_id:?} is not a reservation id such as \"{DEFAULT_RESERVATION}\""
                ),
            );
        }

        let local_ipv4 = match &s.local_ipv4 {
            Some(ip) => p.parse::<Ipv4Addr>("local_ipv4", ip, "an IPv4 address"),
            None => Some(DEFAULT_LOCAL_IPV4),
        }
        .unwrap_or(DEFAULT_LOCAL_IPV4);
        let local_hostname = s
            .local_hostname
            .clone()
            .unwrap_or_else(|| private_hostname(local_ipv4, &region));
        let public_ipv4 = s
            .public_ipv4
            .as_ref()
            .and_then(|ip| p.parse::<Ipv4Addr>("public_ipv4", ip, "an IPv4 address"));
        let public_hostname = match (&s.public_hostname, public_ipv4) {
            (Some(h), Some(_)) => Some(h.clone()),
            (Some(_), None) => {
                p.push(
                    "public_hostname",
                    "is set but public_ipv4 is not: EC2 has no public hostname without a public \
                     address, so set public_ipv4 too or remove public_hostname"
                        .into(),
                );
                None
            }
            (None, Some(ip)) => Some(public_hostname(ip, &region, domain)),
            (None, None) => None,
        };
        let ipv6 = s
            .ipv6
            .as_ref()
            .and_then(|ip| p.parse::<Ipv6Addr>("ipv6", ip, "an IPv6 address"));

        let mac = s
            .mac
            .clone()
            .unwrap_or_else(|| DEFAULT_MAC.into())
            .to_ascii_lowercase();
        if !is_mac(&mac) {
            p.push(
                "mac",
                format!("{mac:?} is not a MAC address such as \"{DEFAULT_MAC}\""),
            );
        }
        let interface_id = s.interface_id.clone().unwrap_or_else(|| DEFAULT_ENI.into());
        if !is_prefixed_id(&interface_id, "eni-") {
            p.push(
                "interface_id",
                format!("{interface_id:?} is not an ENI id such as \"{DEFAULT_ENI}\""),
            );
        }
        let subnet_id = s.subnet_id.clone().unwrap_or_else(|| DEFAULT_SUBNET.into());
        if !is_prefixed_id(&subnet_id, "subnet-") {
            p.push(
                "subnet_id",
                format!("{subnet_id:?} is not a subnet id such as \"{DEFAULT_SUBNET}\""),
            );
        }
        let vpc_id = s.vpc_id.clone().unwrap_or_else(|| DEFAULT_VPC.into());
        if !is_prefixed_id(&vpc_id, "vpc-") {
            p.push(
                "vpc_id",
                format!("{vpc_id:?} is not a VPC id such as \"{DEFAULT_VPC}\""),
            );
        }
        let subnet_cidr = match &s.subnet_ipv4_cidr_block {
            Some(c) => p.parse::<Ipv4Net>("subnet_ipv4_cidr_block", c, "an IPv4 CIDR block"),
            None => Ipv4Net::new(local_ipv4, 20).ok().map(|n| n.trunc()),
        }
        .unwrap_or_else(|| Ipv4Net::new(local_ipv4, 32).unwrap_or_default());
        let vpc_cidr = match &s.vpc_ipv4_cidr_block {
            Some(c) => p.parse::<Ipv4Net>("vpc_ipv4_cidr_block", c, "an IPv4 CIDR block"),
            None => Ipv4Net::new(local_ipv4, 16).ok().map(|n| n.trunc()),
        }
        .unwrap_or(subnet_cidr);
        if !subnet_cidr.contains(&local_ipv4) {
            p.push(
                "local_ipv4",
                format!("{local_ipv4} is outside subnet_ipv4_cidr_block {subnet_cidr}: change one of them"),
            );
        }
        if !vpc_cidr.contains(&subnet_cidr) {
            p.push(
                "subnet_ipv4_cidr_block",
                format!(
                    "{subnet_cidr} is outside vpc_ipv4_cidr_block {vpc_cidr}: change one of them"
                ),
            );
        }

        let security_groups = match &s.security_groups {
            Some(groups) => groups
                .iter()
                .enumerate()
                .filter_map(|(i, g)| {
                    if !is_prefixed_id(&g.id, "sg-") || g.name.is_empty() || g.name.contains('\n') {
                        p.push(
                            &format!("security_groups[{i}]"),
                            "needs a name and an id such as \"sg-0f3b8d2a6c1e94570\"".into(),
                        );
                        None
                    } else {
                        Some(SecurityGroup {
                            name: g.name.clone(),
                            id: g.id.clone(),
                        })
                    }
                })
                .collect(),
            None => vec![SecurityGroup {
                name: "default".into(),
                id: DEFAULT_SG_ID.into(),
            }],
        };

        let tags = s.tags.clone().unwrap_or_default();
        let tags_in_metadata = s.tags_in_metadata.unwrap_or(false);
        if tags_in_metadata {
            for key in tags.keys() {
                if !is_imds_tag_key(key) {
                    p.push(
                        &format!("tags.{key}"),
                        "cannot be served in instance metadata: keys there may use only letters, \
                         digits and + - = . , _ : @, and may not be \".\", \"..\" or \"_index\"; \
                         rename the tag or set tags_in_metadata = false"
                            .into(),
                    );
                }
            }
        }

        let user_data = p.user_data(s);

        let public_keys = s
            .public_keys
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, k)| {
                if k.name.is_empty()
                    || k.name.contains(['\n', '/', '='])
                    || k.openssh_key.is_empty()
                {
                    p.push(
                        &format!("public_keys[{i}]"),
                        "needs a name (no '/', '=' or newline) and an openssh_key".into(),
                    );
                    None
                } else {
                    Some(PublicKey {
                        name: k.name.clone(),
                        openssh_key: k.openssh_key.clone(),
                    })
                }
            })
            .collect();

        let instance_monitoring = s
            .instance_monitoring
            .clone()
            .unwrap_or_else(|| "disabled".into());
        if !["enabled", "disabled"].contains(&instance_monitoring.as_str()) {
            p.push(
                "instance_monitoring",
                format!("{instance_monitoring:?} must be \"enabled\" or \"disabled\""),
            );
        }
        let spot_action = s.spot_instance_action.as_ref().and_then(|a| {
            if !["terminate", "stop", "hibernate"].contains(&a.action.as_str()) {
                p.push(
                    "spot_instance_action.action",
                    format!(
                        "{:?} must be \"terminate\", \"stop\" or \"hibernate\"",
                        a.action
                    ),
                );
            }
            p.time("spot_instance_action.time", &a.time)
                .map(|time| SpotAction {
                    action: a.action.clone(),
                    time,
                })
        });
        let rebalance_notice_time = s
            .rebalance_notice_time
            .as_ref()
            .and_then(|t| p.time("rebalance_notice_time", t));
        let autoscaling_target_lifecycle_state = s.autoscaling_target_lifecycle_state.clone();
        if let Some(state) = &autoscaling_target_lifecycle_state {
            const STATES: [&str; 8] = [
                "InService",
                "Detached",
                "Standby",
                "Terminated",
                "Warmed:Hibernated",
                "Warmed:Running",
                "Warmed:Stopped",
                "Warmed:Terminated",
            ];
            if !STATES.contains(&state.as_str()) {
                p.push(
                    "autoscaling_target_lifecycle_state",
                    format!("{state:?} must be one of {}", STATES.join(", ")),
                );
            }
        }

        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(Instance {
            account_id,
            region,
            partition,
            domain,
            availability_zone,
            availability_zone_id,
            instance_id,
            instance_type,
            ami_id,
            architecture,
            instance_life_cycle,
            launch_time,
            reservation_id,
            local_ipv4,
            local_hostname,
            public_ipv4,
            public_hostname,
            ipv6,
            mac,
            interface_id,
            subnet_id,
            subnet_cidr,
            vpc_id,
            vpc_cidr,
            security_groups,
            tags,
            tags_in_metadata,
            user_data,
            public_keys,
            instance_monitoring,
            spot_action,
            rebalance_notice_time,
            autoscaling_target_lifecycle_state,
        })
    }
}

/// Collects problems while resolving.
#[derive(Default)]
struct Problems(Vec<InstanceProblem>);

impl Problems {
    fn push(&mut self, key: &str, message: String) {
        self.0.push(InstanceProblem {
            key: key.to_string(),
            message,
        });
    }

    fn parse<T: std::str::FromStr>(&mut self, key: &str, value: &str, what: &str) -> Option<T> {
        match value.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.push(key, format!("{value:?} is not {what}"));
                None
            }
        }
    }

    fn time(&mut self, key: &str, value: &str) -> Option<SystemTime> {
        match humantime::parse_rfc3339(value) {
            Ok(t) => Some(t),
            Err(_) => {
                self.push(
                    key,
                    format!("{value:?} is not a UTC time such as \"2026-01-02T03:04:05Z\""),
                );
                None
            }
        }
    }

    fn user_data(&mut self, s: &InstanceSection) -> Option<Bytes> {
        let given = [
            s.user_data.is_some(),
            s.user_data_base64.is_some(),
            s.user_data_file.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            self.push(
                "user_data",
                "set only one of user_data, user_data_base64 and user_data_file".into(),
            );
            return None;
        }
        let (key, bytes) = if let Some(text) = &s.user_data {
            ("user_data", Bytes::from(text.clone().into_bytes()))
        } else if let Some(b64) = &s.user_data_base64 {
            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(b) => ("user_data_base64", Bytes::from(b)),
                Err(e) => {
                    self.push("user_data_base64", format!("is not valid base64: {e}"));
                    return None;
                }
            }
        } else if let Some(path) = &s.user_data_file {
            match std::fs::read(path) {
                Ok(b) => ("user_data_file", Bytes::from(b)),
                Err(e) => {
                    self.push(
                        "user_data_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    return None;
                }
            }
        } else {
            return None;
        };
        if bytes.len() > MAX_USER_DATA {
            self.push(
                key,
                format!(
                    "is {} bytes; EC2 accepts at most {MAX_USER_DATA} bytes of user data",
                    bytes.len()
                ),
            );
            return None;
        }
        Some(bytes)
    }
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `cn-north-1`, `ap-southeast-4`, …
pub fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_prefixed_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_imds_tag_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 128
        && k != "."
        && k != ".."
        && k != "_index"
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-=.,_:@".contains(&b))
}

/// The AWS partition and service domain of a region.
pub fn partition_of(region: &str) -> (&'static str, &'static str) {
    if region.starts_with("cn-") {
        ("aws-cn", "amazonaws.com.cn")
    } else if region.starts_with("us-gov-") {
        ("aws-us-gov", "amazonaws.com")
    } else if region.starts_with("us-isob-") {
        ("aws-iso-b", "sc2s.sgov.gov")
    } else if region.starts_with("us-iso-") {
        ("aws-iso", "c2s.ic.gov")
    } else {
        ("aws", "amazonaws.com")
    }
}

/// The short form used in zone ids: `us-east-1` → `use1`, `ap-southeast-2` → `apse2`.
fn region_abbreviation(region: &str) -> String {
    let parts: Vec<&str> = region.split('-').collect();
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 || i == parts.len() - 1 {
            out.push_str(part);
            continue;
        }
        let short = match *part {
            "northeast" => "ne",
            "northwest" => "nw",
            "southeast" => "se",
            "southwest" => "sw",
            "gov" => "g",
            other => &other[..1.min(other.len())],
        };
        out.push_str(short);
    }
    out
}

/// `ip-172-31-24-117.ec2.internal` in us-east-1, `ip-….<region>.compute.internal` elsewhere.
fn private_hostname(ip: Ipv4Addr, region: &str) -> String {
    let dashed = ip.to_string().replace('.', "-");
    if region == "us-east-1" {
        format!("ip-{dashed}.ec2.internal")
    } else {
        format!("ip-{dashed}.{region}.compute.internal")
    }
}

/// `ec2-203-0-113-25.compute-1.amazonaws.com` in us-east-1, `ec2-….<region>.compute.<domain>` elsewhere.
fn public_hostname(ip: Ipv4Addr, region: &str, domain: &str) -> String {
    let dashed = ip.to_string().replace('.', "-");
    if region == "us-east-1" {
        format!("ec2-{dashed}.compute-1.{domain}")
    } else {
        format!("ec2-{dashed}.{region}.compute.{domain}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(section: InstanceSection) -> Result<Instance, Vec<InstanceProblem>> {
        Instance::resolve(&section, &InstanceDefaults::default())
    }

    #[test]
    fn defaults_agree_with_each_other() {
        let i = resolve(InstanceSection::default()).expect("defaults are valid");
        assert_eq!(i.region, "us-east-1");
        assert_eq!(i.availability_zone, "us-east-1a");
        assert_eq!(i.availability_zone_id, "use1-az1");
        assert_eq!(i.local_hostname, "ip-172-31-24-117.ec2.internal");
        assert!(i.subnet_cidr.contains(&i.local_ipv4));
        assert!(i.vpc_cidr.contains(&i.subnet_cidr));
        assert_eq!(i.partition, "aws");
        assert!(i.public_ipv4.is_none() && i.public_hostname.is_none());
    }

    #[test]
    fn region_follows_the_zone_and_the_operator() {
        let i = resolve(InstanceSection {
            availability_zone: Some("eu-west-2b".into()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(i.region, "eu-west-2");
        assert_eq!(i.availability_zone_id, "euw2-az2");
        assert_eq!(
            i.local_hostname,
            "ip-172-31-24-117.eu-west-2.compute.internal"
        );

        let i = Instance::resolve(
            &InstanceSection::default(),
            &InstanceDefaults {
                region: Some("cn-north-1".into()),
                ..Default::default()
            },
        )
        .expect("valid");
        assert_eq!((i.partition, i.domain), ("aws-cn", "amazonaws.com.cn"));
        assert_eq!(i.availability_zone, "cn-north-1a");
    }

    #[test]
    fn a_zone_outside_the_region_is_refused_with_the_fix() {
        let err = resolve(InstanceSection {
            region: Some("us-east-1".into()),
            availability_zone: Some("us-west-2a".into()),
            ..Default::default()
        })
        .expect_err("inconsistent");
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].key, "availability_zone");
        assert!(
            err[0].message.contains("\"us-east-1a\""),
            "{}",
            err[0].message
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let err = resolve(InstanceSection {
            account_id: Some("12".into()),
            mac: Some("zz".into()),
            local_ipv4: Some("300.1.1.1".into()),
            user_data: Some("a".into()),
            user_data_base64: Some("YQ==".into()),
            ..Default::default()
        })
        .expect_err("invalid");
        let keys: Vec<&str> = err.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["account_id", "local_ipv4", "mac", "user_data"]);
    }

    #[test]
    fn mocked_instance_id_is_lyft_compatible() {
        let i = Instance::resolve(
            &InstanceSection::default(),
            &InstanceDefaults {
                mocked_instance_id: Some("mockedid".into()),
                ..Default::default()
            },
        )
        .expect("valid");
        assert_eq!(i.instance_id, "i-mockedid");
    }

    #[test]
    fn tag_keys_are_checked_only_when_served() {
        let tags: BTreeMap<String, String> = [("has space".to_string(), "v".to_string())].into();
        assert!(
            resolve(InstanceSection {
                tags: Some(tags.clone()),
                ..Default::default()
            })
            .is_ok()
        );
        let err = resolve(InstanceSection {
            tags: Some(tags),
            tags_in_metadata: Some(true),
            ..Default::default()
        })
        .expect_err("bad key");
        assert_eq!(err[0].key, "tags.has space");
    }

    #[test]
    fn user_data_over_16_kib_is_refused() {
        let err = resolve(InstanceSection {
            user_data: Some("x".repeat(MAX_USER_DATA + 1)),
            ..Default::default()
        })
        .expect_err("too big");
        assert!(err[0].message.contains("16384"));
    }

    #[test]
    fn region_names_are_recognised() {
        for ok in [
            "us-east-1",
            "us-gov-west-1",
            "ap-southeast-4",
            "cn-northwest-1",
        ] {
            assert!(is_region(ok), "{ok}");
        }
        for bad in ["us-east", "US-EAST-1", "us-east-1a", "", "-1"] {
            assert!(!is_region(bad), "{bad}");
        }
        assert_eq!(region_abbreviation("ap-southeast-2"), "apse2");
        assert_eq!(region_abbreviation("us-gov-west-1"), "usgw1");
    }
}
