//! A synthetic container source, for benchmarks only: `--docker-host synthetic:N` fills the
//! container index with `N` made-up running containers instead of following a Docker Engine.
//!
//! It exists so that the daemon's memory with many containers can be measured without starting
//! thousands of real ones (see `benches/imds.rs` and BENCHMARKS.md): the containers go through the
//! same [`IndexWriter`] as the watcher's, so the index, the identity memo and the prefetched
//! credential cache are exactly what a real engine with `N` containers would produce. Field sizes
//! are realistic: 64-character ids, compose-style names and labels, `IAM_ROLE` in the environment
//! (50 distinct roles), one IPv4 address each on `10.88.0.0/16`, and the labels and environment
//! pass through the watcher's own filter. No traffic is ever sent to those addresses; they are
//! index keys only.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use super::{DockerOptions, DockerStats, kept};
use crate::index::{Change, Container, IndexWriter, Subnet};

/// The `--docker-host` prefix that selects this source.
pub const SCHEME: &str = "synthetic:";

/// At most this many containers: one address each in a /16, minus the network and gateway.
pub const MAX_CONTAINERS: usize = 65_000;

/// The network the synthetic containers are on, and its gateway.
const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 0);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);

/// Distinct roles the containers ask for, so the credential cache holds many sessions of a few
/// roles, as a real host does.
const ROLES: usize = 50;

/// The number of containers a `synthetic:N` host asks for: `None` if `host` is not synthetic,
/// `Some(Err)` with the fix if `N` is unusable.
pub fn count(host: &str) -> Option<Result<usize, String>> {
    let n = host.trim().strip_prefix(SCHEME)?;
    Some(match n.parse::<usize>() {
        Ok(n) if n <= MAX_CONTAINERS => Ok(n),
        _ => Err(format!(
            "{host:?}: write synthetic:N with N from 0 to {MAX_CONTAINERS} (a benchmark-only source of made-up containers)"
        )),
    })
}

/// The `i`-th synthetic container, as the watcher would index it under `options`: its
/// environment and labels go through the same filter as a real container's.
pub fn container(i: usize, options: &DockerOptions) -> Container {
    // A realistic id: 64 hex characters, stable for a given `i`.
    let digest = Sha256::digest(format!("imdsd-synthetic-{i}").as_bytes());
    let mut id = String::with_capacity(64);
    for b in digest {
        let _ = write!(id, "{b:02x}");
    }
    // .0 is the network and .1 the gateway; the containers start at .2.
    let offset = u32::try_from(i).unwrap_or(u32::MAX).saturating_add(2);
    let address = Ipv4Addr::from(u32::from(SUBNET).saturating_add(offset));
    let service = format!("service-{:03}", i % 500);
    let replica = i / 500 + 1;
    // What compose puts on a container, and a typical environment.
    let labels = [
        ("com.docker.compose.project", "bench".to_string()),
        ("com.docker.compose.service", service.clone()),
        ("com.docker.compose.container-number", replica.to_string()),
        ("com.docker.compose.config-hash", id.chars().rev().collect()),
        ("com.docker.compose.version", "2.29.7".to_string()),
        (
            "com.docker.compose.project.working_dir",
            "/srv/bench".to_string(),
        ),
    ];
    let env = [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOSTNAME", &id[..12]),
        ("IAM_ROLE", &format!("bench-role-{:02}", i % ROLES)),
    ];
    Container {
        name: format!("bench-{service}-{replica}"),
        started_at: format!(
            "2026-01-01T00:{:02}:{:02}.123456789Z",
            (i / 60) % 60,
            i % 60
        ),
        image: format!("registry.example.com/bench/{service}:1.0.{}", i % 7),
        addresses: vec![IpAddr::V4(address)],
        networks: vec!["bench_default".to_string()],
        labels: kept(
            &options.label_keys,
            labels.into_iter().map(|(k, v)| (k.to_string(), v)),
        ),
        env: kept(
            &options.env_keys,
            env.into_iter().map(|(k, v)| (k.to_string(), v.to_string())),
        ),
        id,
    }
}

/// Feeds `n` synthetic containers through `writer`, marks the index synced and connected, and
/// waits for `shutdown`. There are no events afterwards: the containers run forever.
pub async fn run(
    n: usize,
    options: &DockerOptions,
    writer: &mut IndexWriter,
    stats: &Arc<DockerStats>,
    shutdown: CancellationToken,
) {
    // A /16 prefix is always valid, so the list always holds the one network.
    let subnets: Vec<IpNet> = ipnet::Ipv4Net::new(SUBNET, 16)
        .map(IpNet::V4)
        .into_iter()
        .collect();
    writer.set_networks(
        subnets
            .into_iter()
            .map(|net| Subnet {
                network: "bench_default".into(),
                net,
                gateway: Some(IpAddr::V4(GATEWAY)),
                served: true,
            })
            .collect(),
    );
    // A full listing leaves nothing in doubt.
    let _ = writer.apply(Change::Replace(
        (0..n).map(|i| container(i, options)).collect(),
    ));
    stats.connected.store(true, Ordering::Release);
    writer.set_ready();
    tracing::warn!(
        containers = n,
        "serving synthetic containers (--docker-host synthetic:N is for benchmarks, not a Docker Engine)"
    );
    shutdown.cancelled().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::NetworkScope;
    use crate::identity::container::ContainerRules;

    fn options() -> DockerOptions {
        let rules = ContainerRules::default();
        DockerOptions {
            host: "synthetic:1000".into(),
            resync_every: std::time::Duration::from_secs(300),
            env_keys: rules.env_keys(),
            label_keys: rules.label_keys(),
            networks: NetworkScope::All,
        }
    }

    #[test]
    fn only_synthetic_hosts_with_a_usable_count_are_recognised() {
        assert_eq!(count("synthetic:10000"), Some(Ok(10_000)));
        assert_eq!(count("synthetic:0"), Some(Ok(0)));
        assert!(matches!(count("synthetic:lots"), Some(Err(_))));
        assert!(matches!(count("synthetic:70000"), Some(Err(_))));
        assert_eq!(count("unix:///var/run/docker.sock"), None);
    }

    #[test]
    fn containers_look_real_and_are_distinct() {
        let a = container(0, &options());
        let b = container(9_999, &options());
        assert_eq!(a.id.len(), 64);
        assert!(a.id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.id, b.id);
        assert_eq!(
            a.addresses,
            vec!["10.88.0.2".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            b.addresses,
            vec!["10.88.39.17".parse::<IpAddr>().expect("ip")]
        );
        // Filtered as real containers are: only what imdsd reads is kept.
        assert_eq!(a.env.len(), 1);
        assert_eq!(a.env["IAM_ROLE"], "bench-role-00");
        assert!(a.labels.is_empty());
    }

    #[tokio::test]
    async fn the_index_holds_every_container_and_is_ready() {
        let (index, mut writer) = crate::index::index();
        let stats = Arc::new(DockerStats::default());
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        run(1_000, &options(), &mut writer, &stats, shutdown).await;
        assert!(index.is_ready());
        assert_eq!(index.len(), 1_000);
        let c = index
            .lookup("10.88.3.233".parse().expect("ip"))
            .expect("the 1000th container");
        assert_eq!(*c, container(999, &options()));
        assert!(index.is_container_address("10.88.200.1".parse().expect("ip")));
        assert!(!index.is_container_address("10.88.0.1".parse().expect("ip")));
        assert!(stats.connected.load(Ordering::Acquire));
    }
}
