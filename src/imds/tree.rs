//! The static part of the metadata tree, rendered once from the [`Instance`] at startup: every
//! response body is a ready `Bytes`, so serving a path is one hash lookup.
//!
//! What varies per caller is not here: the `iam/` subtree (and so the `meta-data/` listing, which
//! shows `iam/` only to callers with a role) is served by the handler.
//!
//! Listings follow EC2: entries separated by LF with none after the last, sorted byte-wise,
//! directories with a trailing `/`. Leaves have no trailing newline.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::path::VERSIONS;
use super::response::{ContentType, json_str, pretty_object};
use crate::clock::format_iso8601;
use crate::instance::Instance;

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory and its listing.
    Dir(Bytes),
    Leaf(Bytes, ContentType),
}

/// The rendered tree, keyed by the path below the version (`meta-data/instance-id`).
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: HashMap<String, Node>,
    root_listing: Bytes,
    meta_data_with_iam: Bytes,
    meta_data_without_iam: Bytes,
}

impl Tree {
    pub fn build(instance: &Instance) -> Self {
        let mut b = Builder::default();
        let i = instance;
        let md = |p: &str| format!("meta-data/{p}");

        b.leaf(&md("ami-id"), &i.ami_id);
        b.leaf(&md("ami-launch-index"), "0");
        b.leaf(&md("ami-manifest-path"), "(unknown)");
        b.leaf(&md("block-device-mapping/ami"), "/dev/xvda");
        b.leaf(&md("block-device-mapping/root"), "/dev/xvda");
        b.leaf(&md("events/maintenance/history"), "[ ]");
        b.leaf(&md("events/maintenance/scheduled"), "[ ]");
        if let Some(t) = i.rebalance_notice_time {
            b.leaf(
                &md("events/recommendations/rebalance"),
                &format!("{{\"noticeTime\": \"{}\"}}", format_iso8601(t)),
            );
        }
        b.leaf(&md("hostname"), &i.local_hostname);
        b.leaf(
            &md("identity-credentials/ec2/info"),
            &pretty_object(&[
                ("Code", json_str("Success")),
                ("LastUpdated", json_str(&format_iso8601(i.launch_time))),
                ("AccountId", json_str(&i.account_id)),
            ]),
        );
        b.leaf(&md("instance-action"), "none");
        b.leaf(&md("instance-id"), &i.instance_id);
        b.leaf(&md("instance-life-cycle"), &i.instance_life_cycle);
        b.leaf(&md("instance-type"), &i.instance_type);
        if let Some(v6) = i.ipv6 {
            b.leaf(&md("ipv6"), &v6.to_string());
        }
        b.leaf(&md("local-hostname"), &i.local_hostname);
        b.leaf(&md("local-ipv4"), &i.local_ipv4.to_string());
        b.leaf(&md("mac"), &i.mac);

        let nic = format!("network/interfaces/macs/{}", i.mac);
        let sg_names = i
            .security_groups
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let sg_ids = i
            .security_groups
            .iter()
            .map(|g| g.id.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let nic_leaves: Vec<(&str, String)> = vec![
            ("device-number", "0".into()),
            ("interface-id", i.interface_id.clone()),
            ("local-hostname", i.local_hostname.clone()),
            ("local-ipv4s", i.local_ipv4.to_string()),
            ("mac", i.mac.clone()),
            ("network-card-index", "0".into()),
            ("owner-id", i.account_id.clone()),
            ("security-group-ids", sg_ids),
            ("security-groups", sg_names.clone()),
            ("subnet-id", i.subnet_id.clone()),
            ("subnet-ipv4-cidr-block", i.subnet_cidr.to_string()),
            ("vpc-id", i.vpc_id.clone()),
            ("vpc-ipv4-cidr-block", i.vpc_cidr.to_string()),
            ("vpc-ipv4-cidr-blocks", i.vpc_cidr.to_string()),
        ];
        for (name, value) in nic_leaves {
            b.leaf(&md(&format!("{nic}/{name}")), &value);
        }
        if let (Some(ip), Some(host)) = (i.public_ipv4, &i.public_hostname) {
            b.leaf(&md(&format!("{nic}/public-ipv4s")), &ip.to_string());
            b.leaf(&md(&format!("{nic}/public-hostname")), host);
            b.leaf(
                &md(&format!("{nic}/ipv4-associations/{ip}")),
                &i.local_ipv4.to_string(),
            );
            b.leaf(&md("public-ipv4"), &ip.to_string());
            b.leaf(&md("public-hostname"), host);
        }
        if let Some(v6) = i.ipv6 {
            b.leaf(&md(&format!("{nic}/ipv6s")), &v6.to_string());
        }

        b.leaf(&md("placement/availability-zone"), &i.availability_zone);
        b.leaf(
            &md("placement/availability-zone-id"),
            &i.availability_zone_id,
        );
        b.leaf(&md("placement/region"), &i.region);
        b.leaf(&md("profile"), "default-hvm");
        b.leaf(&md("reservation-id"), &i.reservation_id);
        b.leaf(&md("security-groups"), &sg_names);
        b.leaf(&md("services/domain"), i.domain);
        b.leaf(&md("services/partition"), i.partition);

        // `public-keys/` lists `<index>=<name>`, and each index is a directory holding the key.
        if !i.public_keys.is_empty() {
            for (n, key) in i.public_keys.iter().enumerate() {
                b.leaf(
                    &md(&format!("public-keys/{n}/openssh-key")),
                    &key.openssh_key,
                );
            }
            let listing = i
                .public_keys
                .iter()
                .enumerate()
                .map(|(n, k)| format!("{n}={}", k.name))
                .collect::<Vec<_>>()
                .join("\n");
            b.listing_override(&md("public-keys"), listing);
        }
        if let Some(spot) = &i.spot_action {
            let when = format_iso8601(spot.time);
            b.leaf(
                &md("spot/instance-action"),
                &format!("{{\"action\": \"{}\", \"time\": \"{when}\"}}", spot.action),
            );
            b.leaf(&md("spot/termination-time"), &when);
        }
        if let Some(state) = &i.autoscaling_target_lifecycle_state {
            b.leaf(&md("autoscaling/target-lifecycle-state"), state);
        }
        if i.tags_in_metadata {
            b.dir(&md("tags/instance"));
            for (k, v) in &i.tags {
                b.leaf(&md(&format!("tags/instance/{k}")), v);
            }
        }

        let document = identity_document(i);
        b.leaf("dynamic/fws/instance-monitoring", &i.instance_monitoring);
        b.leaf(
            "dynamic/instance-identity/pkcs7",
            &placeholder_signature("pkcs7", &document, 1_100),
        );
        b.leaf(
            "dynamic/instance-identity/rsa2048",
            &placeholder_signature("rsa2048", &document, 1_400),
        );
        b.leaf(
            "dynamic/instance-identity/signature",
            &placeholder_signature("signature", &document, 128),
        );
        b.leaf("dynamic/instance-identity/document", &document);

        if let Some(user_data) = &i.user_data {
            b.nodes.insert(
                "user-data".into(),
                Node::Leaf(user_data.clone(), ContentType::Binary),
            );
            b.register_parents("user-data", false);
        }
        // The IAM subtree is served per caller; registering the directory makes it listed.
        b.dir(&md("iam"));
        b.finish()
    }

    /// The node at `path` (below the version), or `None` for a 404. The `iam/` subtree is not here.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// `/`: the metadata versions, ending with `latest`.
    pub fn root_listing(&self) -> Bytes {
        self.root_listing.clone()
    }

    /// The `meta-data/` listing for a caller with or without a role.
    pub fn meta_data_listing(&self, with_iam: bool) -> Bytes {
        if with_iam {
            self.meta_data_with_iam.clone()
        } else {
            self.meta_data_without_iam.clone()
        }
    }
}

#[derive(Default)]
struct Builder {
    nodes: HashMap<String, Node>,
    children: BTreeMap<String, BTreeSet<String>>,
    overrides: HashMap<String, String>,
}

impl Builder {
    fn leaf(&mut self, path: &str, value: &str) {
        self.nodes.insert(
            path.to_string(),
            Node::Leaf(Bytes::from(value.to_string()), ContentType::Text),
        );
        self.register_parents(path, false);
    }

    fn dir(&mut self, path: &str) {
        self.children.entry(path.to_string()).or_default();
        self.register_parents(path, true);
    }

    fn listing_override(&mut self, path: &str, listing: String) {
        self.overrides.insert(path.to_string(), listing);
    }

    fn register_parents(&mut self, path: &str, is_dir: bool) {
        let mut child = path.to_string();
        let mut child_is_dir = is_dir;
        while let Some(idx) = child.rfind('/') {
            let parent = child[..idx].to_string();
            let name = &child[idx + 1..];
            let entry = if child_is_dir {
                format!("{name}/")
            } else {
                name.to_string()
            };
            self.children
                .entry(parent.clone())
                .or_default()
                .insert(entry);
            child = parent;
            child_is_dir = true;
        }
        // A top-level category: listed at the version root, without a slash, as EC2 does.
        self.children
            .entry(String::new())
            .or_default()
            .insert(child);
    }

    fn finish(mut self) -> Tree {
        let version_root = self.children.remove("").unwrap_or_default();
        for (dir, entries) in &self.children {
            let listing = match self.overrides.get(dir) {
                Some(listing) => listing.clone(),
                None => join_sorted(entries.iter().map(String::as_str)),
            };
            self.nodes
                .insert(dir.clone(), Node::Dir(Bytes::from(listing)));
        }
        // The version root lists categories without a slash, as EC2 does.
        self.nodes.insert(
            String::new(),
            Node::Dir(Bytes::from(join_sorted(
                version_root.iter().map(String::as_str),
            ))),
        );
        let with_iam = match self.nodes.get("meta-data") {
            Some(Node::Dir(listing)) => listing.clone(),
            _ => Bytes::new(),
        };
        let without_iam = Bytes::from(join_sorted(
            std::str::from_utf8(&with_iam)
                .unwrap_or_default()
                .split('\n')
                .filter(|e| *e != "iam/"),
        ));
        let root_listing = Bytes::from(
            VERSIONS
                .iter()
                .copied()
                .chain(std::iter::once("latest"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        Tree {
            nodes: self.nodes,
            root_listing,
            meta_data_with_iam: with_iam,
            meta_data_without_iam: without_iam,
        }
    }
}

/// Entries sorted byte-wise by name (ignoring the directory slash), joined by LF, no final LF.
fn join_sorted<'a>(entries: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = entries.filter(|e| !e.is_empty()).collect();
    v.sort_by(|a, b| a.trim_end_matches('/').cmp(b.trim_end_matches('/')));
    v.join("\n")
}

/// The instance identity document in EC2's layout: 15 keys in EC2's order, `" : "` separators,
/// `null` for what does not apply.
pub fn identity_document(i: &Instance) -> String {
    pretty_object(&[
        ("accountId", json_str(&i.account_id)),
        ("architecture", json_str(&i.architecture)),
        ("availabilityZone", json_str(&i.availability_zone)),
        ("billingProducts", "null".into()),
        ("devpayProductCodes", "null".into()),
        ("marketplaceProductCodes", "null".into()),
        ("imageId", json_str(&i.ami_id)),
        ("instanceId", json_str(&i.instance_id)),
        ("instanceType", json_str(&i.instance_type)),
        ("kernelId", "null".into()),
        ("pendingTime", json_str(&format_iso8601(i.launch_time))),
        ("privateIp", json_str(&i.local_ipv4.to_string())),
        ("ramdiskId", "null".into()),
        ("region", json_str(&i.region)),
        ("version", json_str("2017-09-30")),
    ])
}

/// Base64 text in the shape of EC2's signatures (64-character lines, no PEM armour), derived from
/// the document. It is not a signature anyone can verify: only AWS holds the keys that make those.
fn placeholder_signature(label: &str, document: &str, len: usize) -> String {
    let mut bytes = Vec::with_capacity(len + 32);
    let mut counter: u32 = 0;
    while bytes.len() < len {
        let mut h = Sha256::new();
        h.update(label.as_bytes());
        h.update(counter.to_be_bytes());
        h.update(document.as_bytes());
        bytes.extend_from_slice(&h.finalize());
        counter += 1;
    }
    bytes.truncate(len);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    b64.as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::{InstanceDefaults, InstanceSection, PublicKeySection};

    fn tree(section: InstanceSection) -> Tree {
        Tree::build(&Instance::resolve(&section, &InstanceDefaults::default()).expect("valid"))
    }

    fn text(node: Option<&Node>) -> String {
        match node {
            Some(Node::Dir(b)) | Some(Node::Leaf(b, _)) => {
                String::from_utf8(b.to_vec()).expect("utf8")
            }
            None => "<none>".into(),
        }
    }

    #[test]
    fn meta_data_listing_is_sorted_with_slashed_directories() {
        let t = tree(InstanceSection::default());
        let listing = String::from_utf8(t.meta_data_listing(true).to_vec()).expect("utf8");
        let entries: Vec<&str> = listing.split('\n').collect();
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| a.trim_end_matches('/').cmp(b.trim_end_matches('/')));
        assert_eq!(entries, sorted);
        for dir in [
            "iam/",
            "placement/",
            "network/",
            "block-device-mapping/",
            "services/",
            "events/",
        ] {
            assert!(entries.contains(&dir), "{dir} missing from {entries:?}");
        }
        assert!(!listing.ends_with('\n'));
        let without = String::from_utf8(t.meta_data_listing(false).to_vec()).expect("utf8");
        assert!(!without.contains("iam/"));
        assert_eq!(without.split('\n').count(), entries.len() - 1);
    }

    #[test]
    fn version_root_lists_categories() {
        let t = tree(InstanceSection::default());
        assert_eq!(text(t.get("")), "dynamic\nmeta-data");
        let t = tree(InstanceSection {
            user_data: Some("#!/bin/sh".into()),
            ..Default::default()
        });
        assert_eq!(text(t.get("")), "dynamic\nmeta-data\nuser-data");
        assert_eq!(
            t.get("user-data"),
            Some(&Node::Leaf(Bytes::from("#!/bin/sh"), ContentType::Binary))
        );
    }

    #[test]
    fn public_keys_list_index_equals_name() {
        let t = tree(InstanceSection {
            public_keys: Some(vec![PublicKeySection {
                name: "my-key".into(),
                openssh_key: "ssh-ed25519 AAAA my-key".into(),
            }]),
            ..Default::default()
        });
        assert_eq!(text(t.get("meta-data/public-keys")), "0=my-key");
        assert_eq!(text(t.get("meta-data/public-keys/0")), "openssh-key");
        assert_eq!(
            text(t.get("meta-data/public-keys/0/openssh-key")),
            "ssh-ed25519 AAAA my-key"
        );
    }

    #[test]
    fn the_network_interface_matches_the_instance() {
        let t = tree(InstanceSection::default());
        let macs = text(t.get("meta-data/network/interfaces/macs"));
        assert_eq!(macs, format!("{}/", text(t.get("meta-data/mac"))));
        let nic = format!(
            "meta-data/network/interfaces/macs/{}",
            text(t.get("meta-data/mac"))
        );
        assert_eq!(
            text(t.get(&format!("{nic}/local-ipv4s"))),
            text(t.get("meta-data/local-ipv4"))
        );
        assert!(t.get("meta-data/public-ipv4").is_none());
        assert!(t.get(&format!("{nic}/public-ipv4s")).is_none());
    }

    #[test]
    fn identity_document_has_ec2s_fifteen_keys_in_order() {
        let t = tree(InstanceSection::default());
        let doc = text(t.get("dynamic/instance-identity/document"));
        let parsed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&doc).expect("json");
        let keys: Vec<&str> = parsed.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "accountId",
                "architecture",
                "availabilityZone",
                "billingProducts",
                "devpayProductCodes",
                "marketplaceProductCodes",
                "imageId",
                "instanceId",
                "instanceType",
                "kernelId",
                "pendingTime",
                "privateIp",
                "ramdiskId",
                "region",
                "version"
            ]
        );
        assert_eq!(parsed["region"], "us-east-1");
        assert!(doc.contains("\"billingProducts\" : null"));
        for sig in ["signature", "pkcs7", "rsa2048"] {
            let s = text(t.get(&format!("dynamic/instance-identity/{sig}")));
            assert!(!s.contains("BEGIN"));
            let joined: String = s.split('\n').collect();
            base64::engine::general_purpose::STANDARD
                .decode(joined)
                .expect("base64");
        }
    }
}
