//! The credential broker: one cache entry per distinct [`AssumeRequest`], each kept fresh in the
//! background so that a caller almost never waits for STS.
//!
//! Rules it keeps:
//! - **Single flight.** Concurrent misses for one key share one source call. The call runs in its
//!   own task, so a client that gives up (SDKs wait one second) does not cancel it, and its result
//!   still lands in the cache for the retry.
//! - **Refresh ahead.** Each entry's refresher starts a new call at
//!   `expiration − (min_remaining + margin + jitter)`, so what a caller sees has at least
//!   `min_remaining` left. The jitter spreads many roles over minutes instead of one second.
//! - **Validity is judged on the wall clock at request time.** Timers are only an optimisation: a
//!   laptop that slept through a refresh notices on its first request and fetches then.
//! - **Last good on failure.** When a refresh fails, the previous credentials are served until
//!   `serve_stale_until` before their real expiry, and the refresher retries with exponential
//!   backoff. Errors are remembered briefly, so a broken role cannot make every request call STS.
//! - **Bounded.** Unpinned entries idle for `idle_ttl` are dropped; above `max_entries` the least
//!   recently used unpinned entry goes. A [`Lease`] pins an entry (a running container holds one).
//! - **Polite to the source.** Every source call first passes the [`Limiter`] (rate, burst and
//!   calls in flight). A fetch started for a waiting caller has caller priority; prefetch, refresh
//!   and retries are background, and a background fetch that a caller joins is promoted. The
//!   cached path never touches the limiter.
//!
//! No lock is held across an await: entry state sits behind a `std::sync::Mutex` taken for a few
//! field updates, and the served credentials are read lock-free through `ArcSwapOption`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::limiter::{Limiter, LimiterOptions, LimiterSnapshot, Priority, Ticket};
use super::{AssumeRequest, CredentialSource, Credentials, SourceError};
use crate::clock::SharedClock;

/// How the broker trades freshness against calls to the source.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Credentials served to callers have at least this long left, unless the source is failing.
    pub min_remaining: Duration,
    /// Extra lead before `min_remaining`, so that a failed refresh has time to be retried.
    pub refresh_margin: Duration,
    /// Upper bound of the random spread added to each refresh time.
    pub max_jitter: Duration,
    /// While the source fails, last-good credentials are served until this long before expiry.
    pub serve_stale_until: Duration,
    /// How long a permanent refusal (AccessDenied, …) is answered from memory.
    pub denied_ttl: Duration,
    /// How long a transient failure is answered from memory when there is nothing to serve.
    pub unavailable_ttl: Duration,
    /// Longest pause between background retries.
    pub max_backoff: Duration,
    /// How long a request waits for a cold fetch before it gets a retryable error.
    pub fetch_wait: Duration,
    /// Unpinned entries not asked for in this long are dropped.
    pub idle_ttl: Duration,
    /// The most entries kept; beyond it the least recently used unpinned entry is dropped.
    pub max_entries: usize,
    /// How many source calls may be made, and how fast; `None` for no limit (a source that makes
    /// no network calls, such as the fake one).
    pub limiter: Option<LimiterOptions>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            min_remaining: Duration::from_secs(30 * 60),
            refresh_margin: Duration::from_secs(5 * 60),
            max_jitter: Duration::from_secs(5 * 60),
            serve_stale_until: Duration::from_secs(5 * 60),
            denied_ttl: Duration::from_secs(30),
            unavailable_ttl: Duration::from_secs(5),
            max_backoff: Duration::from_secs(120),
            fetch_wait: Duration::from_secs(5),
            idle_ttl: Duration::from_secs(3600),
            max_entries: 10_000,
            limiter: Some(LimiterOptions::default()),
        }
    }
}

/// Credentials as served, with when they were obtained.
#[derive(Debug)]
pub struct Served {
    pub credentials: Credentials,
    /// When these credentials were obtained; changes only when the credentials do.
    pub last_updated: SystemTime,
    /// When the background refresh for them starts.
    refresh_at: SystemTime,
    /// The document the HTTP layer serves for these credentials, rendered on first use. It is a
    /// function of the fields above alone, so it is rendered once per credentials rather than
    /// once per request (formatting it was a tenth of a cached request's CPU time).
    rendered: Rendered,
}

/// A rendered credentials document. `Debug` never shows it: it holds the secret key and token.
#[derive(Default)]
struct Rendered(OnceLock<Document>);

/// What the HTTP layer serves for one set of credentials: the document's bytes and its
/// `Last-Modified` header (`last_updated` as an HTTP date), both made once.
#[derive(Clone, PartialEq, Eq)]
pub struct Document {
    pub body: Bytes,
    pub last_modified: http::HeaderValue,
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "<rendered>"
        } else {
            "<not rendered>"
        })
    }
}

impl Served {
    pub fn expiration(&self) -> SystemTime {
        self.credentials.expiration
    }

    /// The rendered document for these credentials: `render(self)` the first time, the same
    /// bytes afterwards. `render` must depend on nothing but `self`.
    pub fn rendered(&self, render: impl FnOnce(&Served) -> Document) -> Document {
        self.rendered.0.get_or_init(|| render(self)).clone()
    }
}

/// A failed fetch, with when it failed (EC2's error document reports it as `LastUpdated`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct FetchError {
    pub error: SourceError,
    pub at: SystemTime,
}

/// Counters for the metrics endpoint and tests.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Requests answered from the cache with at least `min_remaining` left.
    pub hits: AtomicU64,
    /// Requests answered with last-good credentials below `min_remaining`.
    pub stale_served: AtomicU64,
    /// Requests that had to wait for (or join) a fetch.
    pub misses: AtomicU64,
    /// Requests answered with a remembered error without calling the source.
    pub cached_errors: AtomicU64,
    /// Calls made to the source.
    pub source_calls: AtomicU64,
    /// Source calls that failed.
    pub source_errors: AtomicU64,
}

/// A point-in-time copy of [`BrokerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub stale_served: u64,
    pub misses: u64,
    pub cached_errors: u64,
    pub source_calls: u64,
    pub source_errors: u64,
    pub entries: usize,
}

type SharedFetch = Shared<BoxFuture<'static, Result<Arc<Served>, FetchError>>>;

struct Entry {
    key: Arc<AssumeRequest>,
    current: ArcSwapOption<Served>,
    state: Mutex<EntryState>,
    /// Woken whenever a fetch finishes, so the refresher recomputes its plan.
    changed: Notify,
    /// Milliseconds since the Unix epoch (the broker's clock) at the last request.
    last_access_ms: AtomicU64,
    pins: AtomicUsize,
    /// Set when the entry leaves the map, so that [`EntryHandle`]s stop using it.
    retired: AtomicBool,
}

/// What [`Broker::get_now`] found.
#[derive(Debug)]
pub enum Lookup {
    Ready(Result<Arc<Served>, FetchError>),
    Wait(Waiting),
}

/// A fetch to wait for (joined, not started twice), bounded by the broker's `fetch_wait`.
pub struct Waiting {
    broker: Broker,
    fetch: SharedFetch,
    key: Arc<AssumeRequest>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("role", &self.key.role_arn.as_str())
            .finish()
    }
}

impl Waiting {
    pub async fn wait(self) -> Result<Arc<Served>, FetchError> {
        // Boxed: waiting (a timer and the shared fetch) is only for misses, and kept inline it
        // would make the futures that await it larger.
        Box::pin(self.broker.wait(self.fetch, &self.key)).await
    }
}

/// One key, and a shortcut to its cache entry, for [`Broker::get_now`] and [`Broker::get_via`].
///
/// Whoever asks for the same key on every request (the identity's memoised assignment) keeps its
/// key in one of these: the entry is then read through the handle instead of hashing the whole
/// [`AssumeRequest`] into the map shared by every thread, and without a second allocation between
/// the two. The handle owns its key and is filled only from the map's entry for that key, so it
/// cannot answer for any other. An entry that is evicted or dropped for idleness is marked
/// retired, and the next lookup goes through the map (making a new entry) and re-points the handle.
pub struct EntryHandle {
    key: Arc<AssumeRequest>,
    entry: ArcSwapOption<Entry>,
}

impl EntryHandle {
    pub fn new(key: Arc<AssumeRequest>) -> Self {
        EntryHandle {
            key,
            entry: ArcSwapOption::empty(),
        }
    }

    /// The key this handle is for.
    pub fn key(&self) -> &Arc<AssumeRequest> {
        &self.key
    }
}

impl std::fmt::Debug for EntryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryHandle")
            .field("role", &self.key.role_arn.as_str())
            .field("bound", &self.entry.load().is_some())
            .finish()
    }
}

#[derive(Default)]
struct EntryState {
    inflight: Option<SharedFetch>,
    /// The limiter ticket of the fetch in flight, to promote it when a caller joins.
    ticket: Option<Ticket>,
    last_error: Option<(Instant, FetchError)>,
    failures: u32,
    /// After a failure: the earliest time a background retry may start (backoff decided once).
    retry_at: Option<Instant>,
    refresher: Option<AbortHandle>,
}

impl Entry {
    fn lock(&self) -> MutexGuard<'_, EntryState> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Inner {
    source: Arc<dyn CredentialSource>,
    clock: SharedClock,
    config: BrokerConfig,
    entries: RwLock<HashMap<Arc<AssumeRequest>, Arc<Entry>>>,
    stats: BrokerStats,
    limiter: Option<Limiter>,
}

/// Cheap to clone; all clones share one cache.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("source", &self.inner.source.kind())
            .field("entries", &self.len())
            .finish()
    }
}

/// Keeps an entry cached and refreshed for as long as it lives.
pub struct Lease {
    entry: Arc<Entry>,
    broker: Weak<Inner>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.entry.pins.fetch_sub(1, Ordering::AcqRel);
        if let Some(inner) = self.broker.upgrade() {
            // Idle time counts from the moment the last holder let go.
            self.entry
                .last_access_ms
                .store(inner.now_ms(), Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("role", &self.entry.key.role_arn.as_str())
            .finish()
    }
}

impl Broker {
    /// Creates the broker and its janitor task; must be called inside a tokio runtime.
    pub fn new(
        source: Arc<dyn CredentialSource>,
        clock: SharedClock,
        config: BrokerConfig,
    ) -> Self {
        let limiter = config.limiter.map(Limiter::new);
        let inner = Arc::new(Inner {
            source,
            clock,
            config,
            entries: RwLock::new(HashMap::new()),
            stats: BrokerStats::default(),
            limiter,
        });
        tokio::spawn(janitor(Arc::downgrade(&inner)));
        Broker { inner }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    pub fn source_kind(&self) -> &'static str {
        self.inner.source.kind()
    }

    /// Credentials for `key`, from the cache when they are fresh enough, else from the source.
    pub async fn get(&self, key: &Arc<AssumeRequest>) -> Result<Arc<Served>, FetchError> {
        let ready = self.ready(&self.inner.entry(key), self.now());
        match ready {
            Ok(answer) => answer,
            Err(fetch) => Box::pin(self.wait(fetch, key)).await,
        }
    }

    /// The time on the broker's clock, for [`Broker::get_via`].
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// [`Broker::get`] for `handle`'s key, finding the entry through the handle while it is still
    /// cached; else through the map, re-binding the handle. `now` is [`Broker::now`], read by the
    /// caller (who needs the time for other checks too).
    pub async fn get_via(
        &self,
        handle: &EntryHandle,
        now: SystemTime,
    ) -> Result<Arc<Served>, FetchError> {
        match self.get_now(handle, now) {
            Lookup::Ready(answer) => answer,
            Lookup::Wait(fetch) => fetch.wait().await,
        }
    }

    /// [`Broker::get_via`] without waiting: the answer when there is one now (the cached-request
    /// path needs no future at all), else the fetch to wait for.
    pub fn get_now(&self, handle: &EntryHandle, now: SystemTime) -> Lookup {
        match self.ready(&self.bound_entry(handle), now) {
            Ok(answer) => Lookup::Ready(answer),
            Err(fetch) => Lookup::Wait(Waiting {
                broker: self.clone(),
                fetch,
                key: handle.key.clone(),
            }),
        }
    }

    /// `handle`'s entry while it is still cached; else the map's, bound to the handle.
    fn bound_entry(&self, handle: &EntryHandle) -> Arc<Entry> {
        if let Some(entry) = handle.entry.load().as_ref()
            && !entry.retired.load(Ordering::Acquire)
        {
            return entry.clone();
        }
        let entry = self.inner.entry(&handle.key);
        handle.entry.store(Some(entry.clone()));
        entry
    }

    /// The answer for `entry` when there is one without waiting (fresh or servable cached
    /// credentials, or a remembered error), else the fetch to wait for.
    fn ready(
        &self,
        entry: &Arc<Entry>,
        now: SystemTime,
    ) -> Result<Result<Arc<Served>, FetchError>, SharedFetch> {
        let inner = &self.inner;
        entry.last_access_ms.store(unix_ms(now), Ordering::Relaxed);

        if let Some(served) = entry.current.load_full() {
            let left = remaining(served.expiration(), now);
            if left > inner.config.serve_stale_until {
                if now >= served.refresh_at {
                    // Normally the refresher has already started; this covers a late timer (the
                    // host was asleep). Short-lived credentials have a later refresh_at, so this
                    // never turns into a call per request.
                    inner.refresh_if_due(entry);
                }
                let counter = if left >= inner.config.min_remaining {
                    &inner.stats.hits
                } else {
                    &inner.stats.stale_served
                };
                counter.fetch_add(1, Ordering::Relaxed);
                return Ok(Ok(served));
            }
        }

        let inflight = {
            let state = entry.lock();
            if let Some(fetch) = &state.inflight {
                Some((fetch.clone(), state.ticket.clone()))
            } else if let Some((at, err)) = &state.last_error
                && at.elapsed() < inner.error_ttl(&err.error)
            {
                inner.stats.cached_errors.fetch_add(1, Ordering::Relaxed);
                return Ok(Err(err.clone()));
            } else {
                None
            }
        };
        inner.stats.misses.fetch_add(1, Ordering::Relaxed);
        Err(match inflight {
            Some((fetch, ticket)) => {
                // A caller now waits for what may have started as a background fetch.
                inner.promote(ticket.as_ref());
                fetch
            }
            None => inner.start_fetch(entry, Priority::Caller),
        })
    }

    async fn wait(
        &self,
        fetch: SharedFetch,
        key: &AssumeRequest,
    ) -> Result<Arc<Served>, FetchError> {
        let inner = &self.inner;
        match tokio::time::timeout(inner.config.fetch_wait, fetch).await {
            Ok(result) => result,
            Err(_) => Err(FetchError {
                error: SourceError::Unavailable(format!(
                    "no answer from {} within {:?} for {}",
                    inner.source.kind(),
                    inner.config.fetch_wait,
                    key.role_arn
                )),
                at: inner.clock.now(),
            }),
        }
    }

    /// Starts fetching `key` in the background if nothing is cached or in flight.
    pub fn prefetch(&self, key: &Arc<AssumeRequest>) {
        let entry = self.inner.entry(key);
        if entry.current.load().is_none() {
            let state = entry.lock();
            let recent_error = state
                .last_error
                .as_ref()
                .is_some_and(|(at, e)| at.elapsed() < self.inner.error_ttl(&e.error));
            if state.inflight.is_none() && !recent_error {
                drop(state);
                drop(self.inner.start_fetch(&entry, Priority::Background));
            }
        }
    }

    /// Pins `key` in the cache (and starts fetching it) until the lease is dropped.
    pub fn retain(&self, key: &Arc<AssumeRequest>) -> Lease {
        let entry = self.inner.entry(key);
        entry.pins.fetch_add(1, Ordering::AcqRel);
        self.prefetch(key);
        Lease {
            entry,
            broker: Arc::downgrade(&self.inner),
        }
    }

    /// What is cached for `key` right now, without fetching or counting.
    pub fn peek(&self, key: &AssumeRequest) -> Option<Arc<Served>> {
        let entries = self.inner.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.get(key).and_then(|e| e.current.load_full())
    }

    /// The last error for `key`, if its most recent fetch failed.
    pub fn last_error(&self, key: &AssumeRequest) -> Option<FetchError> {
        let entries = self.inner.entries.read().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(key)?;
        let state = entry.lock();
        state.last_error.as_ref().map(|(_, e)| e.clone())
    }

    pub fn len(&self) -> usize {
        self.inner
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the source-call limiter is doing, if there is one.
    pub fn limiter(&self) -> Option<LimiterSnapshot> {
        self.inner.limiter.as_ref().map(Limiter::snapshot)
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        StatsSnapshot {
            hits: s.hits.load(Ordering::Relaxed),
            stale_served: s.stale_served.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            cached_errors: s.cached_errors.load(Ordering::Relaxed),
            source_calls: s.source_calls.load(Ordering::Relaxed),
            source_errors: s.source_errors.load(Ordering::Relaxed),
            entries: self.len(),
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        unix_ms(self.clock.now())
    }

    fn error_ttl(&self, error: &SourceError) -> Duration {
        if error.is_permanent() {
            self.config.denied_ttl
        } else {
            self.config.unavailable_ttl
        }
    }

    /// The entry for `key`, created (with its refresher) if needed.
    fn entry(self: &Arc<Self>, key: &Arc<AssumeRequest>) -> Arc<Entry> {
        if let Some(e) = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return e.clone();
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(key) {
            return e.clone();
        }
        if entries.len() >= self.config.max_entries {
            self.evict_least_recently_used(&mut entries);
        }
        let entry = Arc::new(Entry {
            key: key.clone(),
            current: ArcSwapOption::empty(),
            state: Mutex::new(EntryState::default()),
            changed: Notify::new(),
            last_access_ms: AtomicU64::new(self.now_ms()),
            pins: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        });
        let task = tokio::spawn(refresher(Arc::downgrade(self), Arc::downgrade(&entry)));
        entry.lock().refresher = Some(task.abort_handle());
        entries.insert(key.clone(), entry.clone());
        entry
    }

    fn evict_least_recently_used(&self, entries: &mut HashMap<Arc<AssumeRequest>, Arc<Entry>>) {
        let victim = entries
            .iter()
            .filter(|(_, e)| e.pins.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, e)| e.last_access_ms.load(Ordering::Relaxed))
            .map(|(k, _)| k.clone());
        if let Some(key) = victim
            && let Some(entry) = entries.remove(&key)
        {
            tracing::debug!(role = %key.role_arn, "credential cache full; dropping the least recently used entry");
            retire(&entry);
        }
    }

    /// Lets a queued fetch go before background ones: a caller waits for it.
    fn promote(&self, ticket: Option<&Ticket>) {
        if let (Some(limiter), Some(ticket)) = (&self.limiter, ticket) {
            limiter.promote(ticket);
        }
    }

    /// Starts a fetch for `entry` unless one is running; returns a handle to it either way. A
    /// running one is promoted if `priority` says a caller waits.
    fn start_fetch(self: &Arc<Self>, entry: &Arc<Entry>, priority: Priority) -> SharedFetch {
        let mut state = entry.lock();
        if let Some(fetch) = &state.inflight {
            let (fetch, ticket) = (fetch.clone(), state.ticket.clone());
            drop(state);
            if priority == Priority::Caller {
                self.promote(ticket.as_ref());
            }
            return fetch;
        }
        let ticket = self.limiter.as_ref().map(|_| Ticket::new(priority));
        state.ticket.clone_from(&ticket);
        let inner = self.clone();
        let task_entry = entry.clone();
        // The lock is held until `inflight` is set, so the task cannot clear it first.
        let task = tokio::spawn(async move { inner.fetch_once(&task_entry, ticket).await });
        let clock = self.clock.clone();
        let fetch = async move {
            task.await.unwrap_or_else(|e| {
                Err(FetchError {
                    error: SourceError::Unavailable(format!("credential fetch aborted: {e}")),
                    at: clock.now(),
                })
            })
        }
        .boxed()
        .shared();
        state.inflight = Some(fetch.clone());
        fetch
    }

    /// Starts a background refresh if none is running and the backoff allows one now.
    fn refresh_if_due(self: &Arc<Self>, entry: &Arc<Entry>) {
        let state = entry.lock();
        if state.inflight.is_some() {
            return;
        }
        if state.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        drop(state);
        drop(self.start_fetch(entry, Priority::Background));
    }

    async fn fetch_once(
        &self,
        entry: &Arc<Entry>,
        ticket: Option<Ticket>,
    ) -> Result<Arc<Served>, FetchError> {
        let permit = match (&self.limiter, ticket) {
            (Some(limiter), Some(ticket)) => Some(limiter.acquire(ticket).await),
            _ => None,
        };
        self.stats.source_calls.fetch_add(1, Ordering::Relaxed);
        let result = self.source.assume(&entry.key).await;
        drop(permit);
        let now = self.clock.now();
        let result = result.and_then(|credentials| match credentials.unusable(now) {
            None => Ok(credentials),
            Some(why) => Err(SourceError::Unavailable(format!(
                "{} answered for {} without usable credentials ({why})",
                self.source.kind(),
                entry.key.role_arn
            ))),
        });
        let outcome = match result {
            Ok(credentials) => {
                let served = Arc::new(self.served(credentials, now, &entry.key));
                entry.current.store(Some(served.clone()));
                let mut state = entry.lock();
                state.inflight = None;
                state.ticket = None;
                state.last_error = None;
                state.failures = 0;
                state.retry_at = None;
                Ok(served)
            }
            Err(error) => {
                self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                let failure = FetchError { error, at: now };
                let mut state = entry.lock();
                state.inflight = None;
                state.ticket = None;
                state.failures = state.failures.saturating_add(1);
                state.last_error = Some((Instant::now(), failure.clone()));
                state.retry_at = Some(Instant::now() + self.backoff(state.failures));
                let attempt = state.failures;
                drop(state);
                let has_last_good = entry.current.load().is_some();
                tracing::warn!(
                    role = %entry.key.role_arn,
                    session = %entry.key.session_name,
                    source = self.source.kind(),
                    attempt,
                    serving_last_good = has_last_good,
                    error = %failure.error,
                    "could not obtain role credentials"
                );
                Err(failure)
            }
        };
        entry.changed.notify_waiters();
        outcome
    }

    fn served(&self, credentials: Credentials, now: SystemTime, key: &AssumeRequest) -> Served {
        let lifetime = remaining(credentials.expiration, now);
        let c = &self.config;
        let jitter_cap = c.max_jitter.min(lifetime / 10);
        let jitter = jitter_cap.mul_f64(fastrand::f64());
        let lead = c.min_remaining + c.refresh_margin + jitter;
        // Short-lived credentials cannot honour the lead; refresh them at half-life instead, and
        // never more often than every 30 seconds.
        const MIN_INTERVAL: Duration = Duration::from_secs(30);
        let refresh_in = lifetime
            .checked_sub(lead)
            .filter(|d| *d >= MIN_INTERVAL)
            .unwrap_or(lifetime / 2)
            .max(MIN_INTERVAL.min(lifetime));
        if lifetime < c.min_remaining + c.refresh_margin {
            tracing::warn!(
                role = %key.role_arn,
                lifetime_secs = lifetime.as_secs(),
                min_remaining_secs = c.min_remaining.as_secs(),
                "the source grants credentials shorter than the refresh threshold; callers will see \
                 less validity than configured (raise the role's session duration)"
            );
        }
        tracing::debug!(
            role = %key.role_arn,
            session = %key.session_name,
            key = %credentials.key_hint(),
            expires = %crate::clock::format_iso8601(credentials.expiration),
            refresh_in_secs = refresh_in.as_secs(),
            "obtained role credentials"
        );
        Served {
            credentials,
            last_updated: crate::clock::floor_to_second(now),
            refresh_at: now + refresh_in,
            rendered: Rendered::default(),
        }
    }

    /// Exponential backoff for background retries: 1 s, 2 s, 4 s … `max_backoff`, ±20 %.
    fn backoff(&self, failures: u32) -> Duration {
        let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(16));
        base.min(self.config.max_backoff)
            .mul_f64(0.8 + 0.4 * fastrand::f64())
    }

    /// How long the refresher should sleep before acting, or `None` to wait for a change.
    fn next_action(&self, entry: &Entry) -> Option<Duration> {
        let state = entry.lock();
        if state.inflight.is_some() {
            return None;
        }
        let current = entry.current.load_full();
        if let Some(retry_at) = state.retry_at {
            // Keep retrying only what someone still needs: last-good credentials in use, or a pin.
            if current.is_some() || entry.pins.load(Ordering::Acquire) > 0 {
                return Some(retry_at.saturating_duration_since(Instant::now()));
            }
            return None;
        }
        current.map(|s| remaining(s.refresh_at, self.clock.now()))
    }
}

/// Per entry: sleep until the next refresh or retry is due, do it, repeat. Holds only weak
/// references while sleeping, and is aborted when its entry is dropped.
async fn refresher(inner: Weak<Inner>, entry: Weak<Entry>) {
    loop {
        let (Some(strong_inner), Some(strong_entry)) = (inner.upgrade(), entry.upgrade()) else {
            return;
        };
        let changed = strong_entry.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let plan = strong_inner.next_action(&strong_entry);
        drop(strong_inner);
        let entry_ref = &strong_entry;
        match plan {
            None => changed.await,
            Some(wait) => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {
                        let Some(inner) = inner.upgrade() else { return };
                        // Re-check: a request may have refreshed in the meantime.
                        if inner.next_action(entry_ref).is_some_and(|d| d.is_zero()) {
                            let fetch = inner.start_fetch(entry_ref, Priority::Background);
                            drop(inner);
                            let _ = fetch.await;
                        }
                    }
                    () = &mut changed => {}
                }
            }
        }
    }
}

/// Drops idle, unpinned entries every so often.
async fn janitor(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.config.idle_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        None => return,
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let idle_ms = u64::try_from(inner.config.idle_ttl.as_millis()).unwrap_or(u64::MAX);
        let now = inner.now_ms();
        let mut entries = inner.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|key, entry| {
            let idle = now.saturating_sub(entry.last_access_ms.load(Ordering::Relaxed));
            let keep = entry.pins.load(Ordering::Acquire) > 0 || idle < idle_ms;
            if !keep {
                tracing::debug!(role = %key.role_arn, session = %key.session_name, "dropping idle credentials");
                retire(entry);
            }
            keep
        });
    }
}

/// Called as `entry` leaves the map.
fn retire(entry: &Entry) {
    entry.retired.store(true, Ordering::Release);
    if let Some(task) = entry.lock().refresher.take() {
        task.abort();
    }
}

/// Idle times are measured on the broker's clock (wall time): a clock step only makes idle,
/// unpinned entries look older or younger, and reading one clock per request instead of two is
/// measurable on the request path.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn remaining(until: SystemTime, now: SystemTime) -> Duration {
    until.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::clock::{Clock, TokioClock};
    use crate::credentials::Secret;
    use crate::identity::role::RoleArn;

    /// A scripted source: counts calls, can be told to fail, and takes a while to answer.
    #[derive(Debug)]
    struct Scripted {
        clock: SharedClock,
        lifetime: Duration,
        delay: Duration,
        calls: AtomicU64,
        failing: AtomicBool,
        denied: AtomicBool,
        /// Answer "success" with empty fields and the Unix epoch, as an SDK does for a cut-off
        /// answer.
        empty: AtomicBool,
        seen: StdMutex<Vec<AssumeRequest>>,
    }

    impl Scripted {
        fn new(clock: SharedClock, lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                clock,
                lifetime,
                delay: Duration::from_millis(50),
                calls: AtomicU64::new(0),
                failing: AtomicBool::new(false),
                denied: AtomicBool::new(false),
                empty: AtomicBool::new(false),
                seen: StdMutex::new(Vec::new()),
            })
        }
        fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl CredentialSource for Scripted {
        fn assume<'a>(
            &'a self,
            request: &'a AssumeRequest,
        ) -> BoxFuture<'a, Result<Credentials, SourceError>> {
            async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                self.seen.lock().expect("lock").push(request.clone());
                tokio::time::sleep(self.delay).await;
                if self.denied.load(Ordering::SeqCst) {
                    return Err(SourceError::Denied {
                        code: "AccessDenied".into(),
                        message: "not allowed".into(),
                    });
                }
                if self.failing.load(Ordering::SeqCst) {
                    return Err(SourceError::Unavailable("sts is down".into()));
                }
                if self.empty.load(Ordering::SeqCst) {
                    return Ok(Credentials {
                        access_key_id: String::new(),
                        secret_access_key: Secret::new(""),
                        session_token: Secret::new(""),
                        expiration: SystemTime::UNIX_EPOCH,
                        assumed_role_arn: None,
                    });
                }
                Ok(Credentials {
                    access_key_id: format!("ASIA{n:016}"),
                    secret_access_key: Secret::new("s".repeat(40)),
                    session_token: Secret::new("token"),
                    expiration: crate::clock::floor_to_second(self.clock.now() + self.lifetime),
                    assumed_role_arn: None,
                })
            }
            .boxed()
        }
        fn default_duration(&self) -> Duration {
            self.lifetime
        }
        fn kind(&self) -> &'static str {
            "scripted"
        }
    }

    fn key(session: &str) -> Arc<AssumeRequest> {
        Arc::new(AssumeRequest::new(
            RoleArn::parse("arn:aws:iam::123456789012:role/app").expect("valid"),
            session,
        ))
    }

    fn setup(lifetime: Duration) -> (Broker, Arc<Scripted>, SharedClock) {
        let clock: SharedClock = Arc::new(TokioClock::starting_at(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ));
        let source = Scripted::new(clock.clone(), lifetime);
        let broker = Broker::new(source.clone(), clock.clone(), BrokerConfig::default());
        (broker, source, clock)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_cold_requests_share_one_call() {
        let (broker, source, _) = setup(Duration::from_secs(3600));
        let k = key("s");
        let results = futures::future::join_all((0..200).map(|_| broker.get(&k))).await;
        assert!(results.iter().all(Result::is_ok));
        let first = results[0]
            .as_ref()
            .expect("ok")
            .credentials
            .access_key_id
            .clone();
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().expect("ok").credentials.access_key_id == first)
        );
        assert_eq!(source.calls(), 1);
        assert_eq!(broker.stats().misses, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn a_document_is_rendered_once_per_credentials_and_never_debug_printed() {
        let (broker, _, _) = setup(Duration::from_secs(3600));
        let k = key("s");
        let renders = AtomicU64::new(0);
        let render = |s: &Served| {
            renders.fetch_add(1, Ordering::SeqCst);
            Document {
                body: Bytes::from(s.credentials.secret_access_key.expose().to_string()),
                last_modified: http::HeaderValue::from_static("then"),
            }
        };
        let first = broker.get(&k).await.expect("ok");
        let again = broker.get(&k).await.expect("ok");
        assert!(first.rendered(render) == again.rendered(render));
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        assert!(!format!("{again:?}").contains(&"s".repeat(40)));
    }

    #[tokio::test(start_paused = true)]
    async fn different_inputs_are_different_entries() {
        let (broker, source, _) = setup(Duration::from_secs(3600));
        let a = key("s");
        let mut with_external_id = (*key("s")).clone();
        with_external_id.external_id = Some("ext-1".into());
        let b = Arc::new(with_external_id);
        let ca = broker.get(&a).await.expect("ok");
        let cb = broker.get(&b).await.expect("ok");
        assert_ne!(ca.credentials.access_key_id, cb.credentials.access_key_id);
        assert_eq!(source.calls(), 2);
        assert_eq!(
            source.seen.lock().expect("lock")[1].external_id.as_deref(),
            Some("ext-1")
        );
    }

    /// Samples every minute for five hours of one-hour credentials: callers always see at least
    /// `min_remaining`, refreshes happen in the background, and `LastUpdated` moves only on rotation.
    #[tokio::test(start_paused = true)]
    async fn callers_never_see_less_than_the_threshold() {
        let (broker, source, clock) = setup(Duration::from_secs(3600));
        let k = key("s");
        let mut rotations = 0;
        let mut last = broker.get(&k).await.expect("ok");
        for _ in 0..300 {
            tokio::time::advance(Duration::from_secs(60)).await;
            // Let the refresher run.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let served = broker.get(&k).await.expect("ok");
            let left = remaining(served.expiration(), clock.now());
            assert!(left >= Duration::from_secs(30 * 60), "only {left:?} left");
            if served.credentials.access_key_id != last.credentials.access_key_id {
                rotations += 1;
                assert!(served.last_updated > last.last_updated);
                // New keys appear well before the old ones expire.
                assert!(remaining(last.expiration(), clock.now()) >= Duration::from_secs(5 * 60));
            } else {
                assert_eq!(served.last_updated, last.last_updated);
            }
            last = served;
        }
        assert!(
            rotations >= 8,
            "{rotations} rotations in 5 h of 1 h credentials"
        );
        assert_eq!(
            broker.stats().misses,
            1,
            "only the very first request waited"
        );
        assert!(source.calls() <= 16, "{} calls", source.calls());
    }

    #[tokio::test(start_paused = true)]
    async fn last_good_is_served_through_an_outage_then_recovers() {
        let (broker, source, clock) = setup(Duration::from_secs(3600));
        let k = key("s");
        let first = broker.get(&k).await.expect("ok");
        source.failing.store(true, Ordering::SeqCst);

        // Up to five minutes before expiry, the last good credentials keep coming.
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(54 * 60) {
            tokio::time::advance(Duration::from_secs(30)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            t += Duration::from_secs(30);
            let served = broker.get(&k).await.expect("last good");
            assert_eq!(
                served.credentials.access_key_id,
                first.credentials.access_key_id
            );
        }
        let calls_during_outage = source.calls();
        assert!(
            calls_during_outage > 3,
            "the refresher retried ({calls_during_outage})"
        );
        assert!(
            calls_during_outage < 60,
            "with backoff, not per request ({calls_during_outage})"
        );

        // Inside the last five minutes the stale credentials are no longer handed out.
        tokio::time::advance(Duration::from_secs(90)).await;
        assert!(remaining(first.expiration(), clock.now()) < Duration::from_secs(5 * 60));
        let err = broker.get(&k).await.expect_err("nothing usable");
        assert!(!err.error.is_permanent());

        source.failing.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(10)).await;
        let recovered = broker.get(&k).await.expect("recovered");
        assert_ne!(
            recovered.credentials.access_key_id,
            first.credentials.access_key_id
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_without_usable_credentials_is_a_failure_and_never_served() {
        let (broker, source, _) = setup(Duration::from_secs(3600));
        let k = key("s");
        let good = broker.get(&k).await.expect("ok");
        source.empty.store(true, Ordering::SeqCst);
        let cold = key("cold");
        let err = broker.get(&cold).await.expect_err("nothing usable");
        assert!(!err.error.is_permanent(), "{err:?}");
        assert!(
            err.to_string().contains("without usable credentials"),
            "{err}"
        );
        assert!(broker.peek(&cold).is_none());
        assert_eq!(broker.stats().source_errors, 1);
        // What was cached stays what is served.
        let still = broker.get(&k).await.expect("cached");
        assert!(Arc::ptr_eq(&good, &still));
        source.empty.store(false, Ordering::SeqCst);
        tokio::time::advance(BrokerConfig::default().unavailable_ttl + Duration::from_secs(1))
            .await;
        let fresh = broker.get(&cold).await.expect("recovered");
        assert!(!fresh.credentials.access_key_id.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_remembered_briefly() {
        let (broker, source, _) = setup(Duration::from_secs(3600));
        source.denied.store(true, Ordering::SeqCst);
        let k = key("s");
        for _ in 0..50 {
            let err = broker.get(&k).await.expect_err("denied");
            assert!(err.error.is_permanent());
        }
        assert_eq!(source.calls(), 1);
        assert_eq!(broker.stats().cached_errors, 49);
        tokio::time::advance(BrokerConfig::default().denied_ttl + Duration::from_secs(1)).await;
        source.denied.store(false, Ordering::SeqCst);
        broker.get(&k).await.expect("allowed now");
        assert_eq!(source.calls(), 2);
    }

    /// A wall clock that can jump, as it does when a laptop wakes up.
    #[derive(Debug)]
    struct JumpingClock {
        base: TokioClock,
        offset: StdMutex<Duration>,
    }

    impl Clock for JumpingClock {
        fn now(&self) -> SystemTime {
            self.base.now() + *self.offset.lock().expect("lock")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_after_the_host_slept_fetches_fresh_credentials() {
        let clock = Arc::new(JumpingClock {
            base: TokioClock::starting_at(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            ),
            offset: StdMutex::new(Duration::ZERO),
        });
        let source = Scripted::new(clock.clone(), Duration::from_secs(3600));
        let broker = Broker::new(source.clone(), clock.clone(), BrokerConfig::default());
        let k = key("s");
        let first = broker.get(&k).await.expect("ok");
        // Suspend: eight hours pass on the wall clock while tokio's timers stand still.
        *clock.offset.lock().expect("lock") = Duration::from_secs(8 * 3600);
        let after = broker.get(&k).await.expect("fresh");
        assert_ne!(
            after.credentials.access_key_id,
            first.credentials.access_key_id
        );
        assert!(remaining(after.expiration(), clock.now()) > Duration::from_secs(50 * 60));
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_credentials_do_not_cause_a_call_per_request() {
        let (broker, source, _) = setup(Duration::from_secs(15 * 60));
        let k = key("s");
        for _ in 0..100 {
            broker.get(&k).await.expect("ok");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(source.calls(), 1, "refreshed at half-life, not per request");
        assert_eq!(broker.stats().stale_served, 99);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_are_dropped_and_leases_keep_them() {
        let (broker, _, _) = setup(Duration::from_secs(3600));
        let idle = key("idle");
        let pinned = key("pinned");
        broker.get(&idle).await.expect("ok");
        let lease = broker.retain(&pinned);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(broker.peek(&pinned).is_some(), "retain prefetches");
        tokio::time::advance(Duration::from_secs(3600 + 120)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(broker.peek(&idle).is_none());
        assert!(broker.peek(&pinned).is_some());
        drop(lease);
        tokio::time::advance(Duration::from_secs(3600 + 120)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(broker.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded() {
        let clock: SharedClock = Arc::new(TokioClock::starting_at(SystemTime::UNIX_EPOCH));
        let source = Scripted::new(clock.clone(), Duration::from_secs(3600));
        let broker = Broker::new(
            source,
            clock,
            BrokerConfig {
                max_entries: 3,
                ..BrokerConfig::default()
            },
        );
        for i in 0..5 {
            broker.get(&key(&format!("s{i}"))).await.expect("ok");
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(broker.len(), 3);
        assert!(broker.peek(&key("s0")).is_none());
        assert!(broker.peek(&key("s4")).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handle_finds_its_key_without_the_map_and_lets_go_of_entries_that_leave_the_cache() {
        let clock: SharedClock = Arc::new(TokioClock::starting_at(SystemTime::UNIX_EPOCH));
        let source = Scripted::new(clock.clone(), Duration::from_secs(3600));
        let broker = Broker::new(
            source.clone(),
            clock,
            BrokerConfig {
                max_entries: 2,
                ..BrokerConfig::default()
            },
        );
        let mine = key("mine");
        let handle = EntryHandle::new(mine.clone());
        let first = broker.get_via(&handle, broker.now()).await.expect("ok");
        let again = broker.get_via(&handle, broker.now()).await.expect("ok");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(source.calls(), 1);
        assert_eq!(broker.stats().hits, 1);

        // A handle for another key gets that key's credentials; one for an equal key (another
        // allocation) shares the entry, and so the credentials, without another fetch.
        let other = key("other");
        let theirs = broker
            .get_via(&EntryHandle::new(other.clone()), broker.now())
            .await
            .expect("ok");
        assert_ne!(
            theirs.credentials.access_key_id,
            first.credentials.access_key_id
        );
        let equal = broker
            .get_via(&EntryHandle::new(key("mine")), broker.now())
            .await
            .expect("ok");
        assert!(Arc::ptr_eq(&equal, &first));
        assert_eq!(source.calls(), 2);
        assert!(format!("{handle:?}").contains("bound: true"), "{handle:?}");

        // Two more keys push "mine" out of the cache (it is the least recently used): the handle
        // must not keep serving the retired entry, but make and use the map's new one.
        tokio::time::advance(Duration::from_millis(10)).await;
        broker.get(&other).await.expect("ok");
        tokio::time::advance(Duration::from_millis(10)).await;
        broker.get(&key("third")).await.expect("ok");
        assert!(broker.peek(&mine).is_none(), "evicted");
        let after = broker.get_via(&handle, broker.now()).await.expect("ok");
        assert_eq!(source.calls(), 4, "fetched again after eviction");
        assert_ne!(
            after.credentials.access_key_id,
            first.credentials.access_key_id
        );
        assert!(Arc::ptr_eq(
            &broker.peek(&mine).expect("cached again"),
            &after
        ));
        let cached = broker.get_via(&handle, broker.now()).await.expect("ok");
        assert!(Arc::ptr_eq(&cached, &after));
        assert_eq!(source.calls(), 4);
    }

    /// Twenty roles are being prefetched at two calls a burst and ten a second when two callers
    /// arrive: one for a role nobody fetches yet, one for a role whose prefetch is still queued.
    /// Both calls go before the background ones queued earlier.
    #[tokio::test(start_paused = true)]
    async fn callers_are_served_before_queued_prefetches_including_one_they_join() {
        let clock: SharedClock = Arc::new(TokioClock::starting_at(SystemTime::UNIX_EPOCH));
        let source = Scripted::new(clock.clone(), Duration::from_secs(3600));
        let broker = Broker::new(
            source.clone(),
            clock,
            BrokerConfig {
                limiter: Some(LimiterOptions {
                    rate: 10.0,
                    burst: 2,
                    concurrency: 2,
                }),
                ..BrokerConfig::default()
            },
        );
        let keys: Vec<_> = (0..20).map(|i| key(&format!("bg{i}"))).collect();
        for k in &keys {
            broker.prefetch(k);
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let queued = broker.limiter().expect("limited");
        assert_eq!(queued.waiting_background, 18, "{queued:?}");

        let fresh = key("caller");
        let (mine, joined) = futures::join!(broker.get(&fresh), broker.get(&keys[15]));
        let (mine, joined) = (mine.expect("ok"), joined.expect("ok"));
        assert_ne!(
            mine.credentials.access_key_id,
            joined.credentials.access_key_id
        );
        let after = broker.limiter().expect("limited");
        assert_eq!(after.admitted_caller, 2, "{after:?}");

        // The rest follow in the background, each once; then the cache answers without the limiter.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(source.calls(), 21);
        let order: Vec<String> = source
            .seen
            .lock()
            .expect("lock")
            .iter()
            .map(|r| r.session_name.clone())
            .collect();
        let at = |name: &str| order.iter().position(|s| s == name).expect(name);
        assert_eq!(at("bg0").max(at("bg1")), 1, "{order:?}");
        assert_eq!(at("caller").max(at("bg15")), 3, "{order:?}");
        for k in &keys {
            broker.get(k).await.expect("cached");
        }
        let done = broker.limiter().expect("limited");
        assert_eq!(
            done.admitted_caller + done.admitted_background,
            21,
            "{done:?}"
        );
        assert_eq!(
            (done.waiting_caller, done.waiting_background, done.in_flight),
            (0, 0, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_request_does_not_cancel_the_fetch() {
        let (broker, source, _) = setup(Duration::from_secs(3600));
        let k = key("s");
        let _ = tokio::time::timeout(Duration::from_millis(10), broker.get(&k)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(broker.peek(&k).is_some());
        broker.get(&k).await.expect("ok");
        assert_eq!(source.calls(), 1);
    }
}
