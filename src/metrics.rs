//! Prometheus metrics: what the request path records (requests by route and status, latency,
//! IMDSv2 tokens, STS call latency), what the listeners record (open connections, connections
//! closed or refused at a cap), and what is read from the other parts at scrape time
//! (credential cache, STS calls and errors, the STS limiter's queue, the Docker index and
//! watcher, log lines dropped).
//!
//! The request path only increments atomics: `prometheus-client`'s families take a read lock on
//! a map that is written once per new label combination, so the request path looks each series up
//! once and keeps it; and its `Histogram` takes a mutex per observation, so request latency goes
//! into [`LatencyHistogram`], which counts with atomics alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::credentials::broker::Broker;
use crate::docker::DockerStats;
use crate::index::Index;

/// Which part of the service a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `PUT /latest/api/token`.
    Token,
    /// `iam/security-credentials/<role>`.
    Credentials,
    /// Anything else under `iam/`.
    Iam,
    /// The rest of the metadata tree.
    Metadata,
    /// Not a metadata path at all.
    Other,
}

impl Route {
    fn index(self) -> usize {
        match self {
            Route::Token => 0,
            Route::Credentials => 1,
            Route::Iam => 2,
            Route::Metadata => 3,
            Route::Other => 4,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::Credentials => "credentials",
            Route::Iam => "iam",
            Route::Metadata => "metadata",
            Route::Other => "other",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The status codes the service answers with, as label values without allocating; anything else
/// is counted as `other`.
const STATUS_LABELS: [&str; 12] = [
    "200", "400", "401", "403", "404", "405", "417", "500", "502", "503", "504", "other",
];

/// Where `status` is in [`STATUS_LABELS`].
fn status_index(status: u16) -> usize {
    match status {
        200 => 0,
        400 => 1,
        401 => 2,
        403 => 3,
        404 => 4,
        405 => 5,
        417 => 6,
        500 => 7,
        502 => 8,
        503 => 9,
        504 => 10,
        _ => 11,
    }
}

const ROUTES: usize = 5;

/// The latency buckets' count and first bound: 50 µs to ~3 s, doubling. The request path is
/// expected in the lowest buckets; cold STS calls land in the top ones.
const LATENCY_BUCKETS: usize = 17;
const FIRST_BOUND_NANOS: u64 = 50_000;

/// The latency buckets' bounds in seconds, as exported.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(
        Duration::from_nanos(FIRST_BOUND_NANOS).as_secs_f64(),
        2.0,
        LATENCY_BUCKETS as u16,
    )
}

/// A histogram of durations over [`latency_buckets`], recorded with two atomic additions: it is
/// on every request, where `prometheus-client`'s `Histogram` would take a mutex. Clones share
/// their counts.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram(Arc<LatencyCounts>);

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Observations per bucket, not cumulative; the last is beyond every bound (`+Inf`).
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.0.buckets[latency_bucket(nanos)].fetch_add(1, Ordering::Relaxed);
    }
}

/// The first bucket whose bound (`FIRST_BOUND_NANOS << i`) is at least `nanos`, or the `+Inf`
/// one. With `q = (nanos - 1) / FIRST_BOUND_NANOS`, bound `i` holds `nanos` exactly when
/// `q < 2^i`, so `i` is one more than `q`'s highest set bit.
fn latency_bucket(nanos: u64) -> usize {
    if nanos <= FIRST_BOUND_NANOS {
        return 0;
    }
    let q = (nanos - 1) / FIRST_BOUND_NANOS;
    usize::try_from(u64::BITS - q.leading_zeros())
        .map_or(LATENCY_BUCKETS, |i| i.min(LATENCY_BUCKETS))
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = latency_buckets()
            .chain([f64::INFINITY])
            .zip(&self.0.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // The count from the same loads as the buckets, so that it always equals `+Inf`'s.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = Duration::from_nanos(self.0.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// What the request path records.
/// The listeners, as metrics (`listener` label) and logs name them.
pub const LISTENER_METADATA: &str = "metadata";
pub const LISTENER_CONTAINER_CREDENTIALS: &str = "container-credentials";
pub const LISTENER_ADMIN: &str = "admin";

/// Why a request was refused, as the `reason` label says: a container calling from a Docker
/// network imdsd does not serve.
pub const REFUSED_NETWORK: &str = "network";
/// Why a request was refused: its `Host` is neither an address nor an accepted name (what a web
/// page rebinding its own name to imdsd's address sends), or it has two (see [`crate::host`]).
pub const REFUSED_HOST: &str = "host";

#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, LatencyHistogram>,
    /// The members of `requests` and `latency` the request path has used, by route and status
    /// index: each is looked up in its family (a lock and a hash of the labels) once, then
    /// shared (they count into the same atomics). Series still appear only once used.
    request_counters: [[OnceLock<Counter>; STATUS_LABELS.len()]; ROUTES],
    route_latency: [OnceLock<LatencyHistogram>; ROUTES],
    tokens_issued: Counter,
    tokens_rejected: Counter,
    sts_latency: Histogram,
    /// Refused before being served, by listener and reason (e.g. a connection cap).
    requests_refused: Family<RefusedLabels, Counter>,
    /// Idle connections closed to make room under a cap, by cap.
    connections_closed: Family<ReasonLabels, Counter>,
    open_connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::default(),
            request_counters: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            route_latency: std::array::from_fn(|_| OnceLock::new()),
            tokens_issued: Counter::default(),
            tokens_rejected: Counter::default(),
            sts_latency: Histogram::new(latency_buckets()),
            requests_refused: Family::default(),
            connections_closed: Family::default(),
            open_connections: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn request(&self, route: Route, status: u16, elapsed: Duration) {
        let status = status_index(status);
        self.request_counters[route.index()][status]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: route.as_str(),
                        status: STATUS_LABELS[status],
                    })
                    .clone()
            })
            .inc();
        self.route_latency[route.index()]
            .get_or_init(|| {
                self.latency
                    .get_or_create(&RouteLabels {
                        route: route.as_str(),
                    })
                    .clone()
            })
            .observe(elapsed);
    }

    pub fn token_issued(&self) {
        self.tokens_issued.inc();
    }

    pub fn token_rejected(&self) {
        self.tokens_rejected.inc();
    }

    /// One call to the credential source (STS), successful or not.
    pub fn source_call(&self, elapsed: Duration) {
        self.sts_latency.observe(elapsed.as_secs_f64());
    }

    /// A request (or a connection, before its request) refused on `listener` for `reason`.
    pub fn request_refused(&self, listener: &'static str, reason: &'static str) {
        self.requests_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    /// An idle connection closed to make room under the cap `reason`.
    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The number of open connections, on every listener.
    pub fn connections_open(&self, open: usize) {
        self.open_connections
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// Requests refused on `listener` for `reason`, for tests.
    pub fn refused_for(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.requests_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .get()
    }

    /// Idle connections closed under the cap `reason`, for tests.
    pub fn closed_for(&self, reason: &'static str) -> u64 {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    /// The number of requests recorded for `route` with `status`, for tests.
    pub fn requests_for(&self, route: Route, status: u16) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.as_str(),
                status: STATUS_LABELS[status_index(status)],
            })
            .get()
    }
}

/// Everything scraped: the request metrics plus the other parts' counters.
pub fn registry(
    metrics: Arc<Metrics>,
    broker: Broker,
    index: Option<Index>,
    docker: Option<Arc<DockerStats>>,
) -> Registry {
    let mut registry = Registry::with_prefix("imdsd");
    registry.register(
        "requests",
        "Metadata requests by route and HTTP status",
        metrics.requests.clone(),
    );
    registry.register(
        "request_duration_seconds",
        "Time to answer a metadata request, by route",
        metrics.latency.clone(),
    );
    registry.register(
        "tokens_issued",
        "IMDSv2 tokens issued",
        metrics.tokens_issued.clone(),
    );
    registry.register(
        "tokens_rejected",
        "Requests refused for an invalid, expired or foreign IMDSv2 token",
        metrics.tokens_rejected.clone(),
    );
    registry.register(
        "sts_call_duration_seconds",
        "Time of each call to the credential source (AssumeRole)",
        metrics.sts_latency.clone(),
    );
    registry.register(
        "requests_refused",
        "Requests (or connections, before their request) refused, by listener and reason",
        metrics.requests_refused.clone(),
    );
    registry.register(
        "connections_closed",
        "Idle connections closed to make room under a connection cap, by cap",
        metrics.connections_closed.clone(),
    );
    registry.register(
        "open_connections",
        "Open client connections, on every listener",
        metrics.open_connections.clone(),
    );
    registry.register_collector(Box::new(Scraped {
        broker,
        index,
        docker,
    }));
    registry
}

/// Renders the registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// Values read from the other parts at scrape time.
#[derive(Debug)]
struct Scraped {
    broker: Broker,
    index: Option<Index>,
    docker: Option<Arc<DockerStats>>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One series per limiter priority (`priority="caller"` and `priority="background"`).
fn by_priority<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    caller: M,
    background: M,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    caller.encode(family.encode_family(&[("priority", "caller")])?)?;
    background.encode(family.encode_family(&[("priority", "background")])?)
}

fn usize_gauge(n: usize) -> ConstGauge {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        counter(
            &mut e,
            "log_lines_dropped",
            "Log lines lost because the log destination (stderr) was full or failing",
            crate::log_writer::lines_dropped(),
        )?;
        let s = self.broker.stats();
        counter(
            &mut e,
            "credential_cache_hits",
            "Credential requests answered from the cache",
            s.hits,
        )?;
        counter(
            &mut e,
            "credential_cache_misses",
            "Credential requests that waited for (or joined) a fetch",
            s.misses,
        )?;
        counter(
            &mut e,
            "credential_cache_stale_served",
            "Last-good credentials served while the source was failing",
            s.stale_served,
        )?;
        counter(
            &mut e,
            "credential_cache_errors_served",
            "Remembered errors served without calling the source",
            s.cached_errors,
        )?;
        counter(
            &mut e,
            "sts_calls",
            "Calls to the credential source (AssumeRole)",
            s.source_calls,
        )?;
        counter(
            &mut e,
            "sts_errors",
            "Failed calls to the credential source",
            s.source_errors,
        )?;
        gauge(
            &mut e,
            "credential_cache_entries",
            "Role sessions in the credential cache",
            i64::try_from(self.broker.len()).unwrap_or(i64::MAX),
        )?;
        if let Some(l) = self.broker.limiter() {
            by_priority(
                &mut e,
                "sts_limiter_waiting",
                "AssumeRole calls waiting for the STS limiter (rate, burst, concurrency), by who waits for them",
                usize_gauge(l.waiting_caller),
                usize_gauge(l.waiting_background),
            )?;
            by_priority(
                &mut e,
                "sts_limiter_admitted",
                "AssumeRole calls let through by the STS limiter, by the priority they went with",
                ConstCounter::new(l.admitted_caller),
                ConstCounter::new(l.admitted_background),
            )?;
            by_priority(
                &mut e,
                "sts_limiter_wait_seconds",
                "Time AssumeRole calls spent waiting for the STS limiter, in total",
                ConstCounter::new(l.waited_caller.as_secs_f64()),
                ConstCounter::new(l.waited_background.as_secs_f64()),
            )?;
            gauge(
                &mut e,
                "sts_limiter_in_flight",
                "AssumeRole calls in flight",
                i64::try_from(l.in_flight).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(index) = &self.index {
            gauge(
                &mut e,
                "docker_containers",
                "Running containers in the index",
                i64::try_from(index.len()).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut e,
                "docker_index_synced",
                "1 while the index mirrors the Docker Engine",
                i64::from(index.is_ready()),
            )?;
        }
        if let Some(d) = &self.docker {
            gauge(
                &mut e,
                "docker_connected",
                "1 while following the Docker Engine's events",
                i64::from(d.connected.load(Ordering::Relaxed)),
            )?;
            counter(
                &mut e,
                "docker_watcher_restarts",
                "Times the connection to the Docker Engine was lost",
                d.reconnects.load(Ordering::Relaxed),
            )?;
            counter(
                &mut e,
                "docker_api_calls",
                "Calls made to the Docker Engine API",
                d.api_calls.load(Ordering::Relaxed),
            )?;
            counter(
                &mut e,
                "docker_events",
                "Docker Engine events applied to the index",
                d.events_applied.load(Ordering::Relaxed),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn every_status_has_its_own_label_and_the_rest_are_other() {
        for status in 100..600 {
            let label = STATUS_LABELS[status_index(status)];
            if label == "other" {
                assert!(!STATUS_LABELS.contains(&status.to_string().as_str()));
            } else {
                assert_eq!(label, status.to_string());
            }
        }
    }

    #[test]
    fn a_duration_goes_to_the_first_bucket_that_holds_it() {
        let bound = |i: usize| FIRST_BOUND_NANOS << i;
        let mut nanos: Vec<u64> = vec![0, 1, u64::MAX];
        for i in 0..LATENCY_BUCKETS {
            nanos.extend([bound(i) - 1, bound(i), bound(i) + 1]);
        }
        for n in nanos {
            let b = latency_bucket(n);
            if b < LATENCY_BUCKETS {
                assert!(n <= bound(b), "{n} ns in bucket {b}");
            }
            if b > 0 {
                assert!(n > bound(b - 1), "{n} ns belongs below bucket {b}");
            }
        }
        assert_eq!(
            latency_bucket(bound(LATENCY_BUCKETS - 1) + 1),
            LATENCY_BUCKETS
        );
    }

    #[test]
    fn the_latency_histogram_exports_what_prometheus_clients_would() {
        let ours = LatencyHistogram::default();
        let theirs = Histogram::new(latency_buckets());
        for micros in [
            0, 1, 50, 51, 80, 100, 101, 3_000, 250_000, 3_276_800, 3_276_801, 10_000_000,
        ] {
            ours.observe(Duration::from_micros(micros));
            theirs.observe(Duration::from_micros(micros).as_secs_f64());
        }
        let export = |register: &dyn Fn(&mut Registry)| {
            let mut registry = Registry::default();
            register(&mut registry);
            let mut text = String::new();
            encode(&mut text, &registry).expect("encode");
            // The sums are added in different units (integer nanoseconds here, floating-point
            // seconds there) and may differ in the last digit.
            text.lines()
                .filter(|l| !l.starts_with("latency_sum"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let ours_text = export(&|r| r.register("latency", "", ours.clone()));
        assert_eq!(
            ours_text,
            export(&|r| r.register("latency", "", theirs.clone()))
        );
        assert!(
            ours_text.contains(&"latency_count 12".to_string()),
            "{ours_text:?}"
        );
        assert!(
            ours_text.contains(&r#"latency_bucket{le="0.0001"} 6"#.to_string()),
            "{ours_text:?}"
        );
    }

    #[test]
    fn remembered_series_count_into_the_exported_families() {
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        registry.register("requests", "", metrics.requests.clone());
        registry.register("latency", "", metrics.latency.clone());
        for _ in 0..3 {
            metrics.request(Route::Credentials, 200, Duration::from_micros(80));
        }
        metrics.request(Route::Token, 401, Duration::from_micros(80));
        metrics.request(Route::Other, 418, Duration::from_micros(80));
        assert_eq!(metrics.requests_for(Route::Credentials, 200), 3);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        for line in [
            r#"requests_total{route="credentials",status="200"} 3"#,
            r#"requests_total{route="token",status="401"} 1"#,
            r#"requests_total{route="other",status="other"} 1"#,
            r#"latency_count{route="credentials"} 3"#,
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        assert!(
            !text.contains(r#"route="iam""#),
            "unused series stay out:\n{text}"
        );
    }
}
