//! The AssumeRole limiter: keeps the daemon's own calls to STS under a rate and a number in flight,
//! so that a start (or a Docker resync) with hundreds of roles does not get the account throttled.
//! STS throttles per account and region, with one token bucket shared by every caller in the
//! account: a daemon that fires 500 AssumeRole calls at once would make STS refuse other
//! software's calls as well as its own.
//!
//! - **Rate and burst.** A token bucket: `burst` calls may go at once after a quiet spell, then
//!   `rate` per second. A burst large enough for a whole host's worth of cold requests lets the
//!   usual start go through without waiting at all.
//! - **Concurrency.** At most `concurrency` calls are in flight; when STS slows down, calls wait
//!   here instead of piling up connections (and timeouts) there.
//! - **Two priorities.** A fetch that a caller is waiting for goes before every background one
//!   (prefetch at start, refresh ahead, retries). A background fetch that a caller starts waiting
//!   for while it is queued is promoted ([`Limiter::promote`]): it moves to the callers' queue.
//!   Within a priority, first come first served.
//!
//! Only fetches pass through here: a request answered from the cache never touches the limiter.
//! The state sits behind a `std::sync::Mutex` held for a few queue operations and never across an
//! await; each waiter is woken by its own `Notify`, and one timer task (armed only while calls wait
//! for tokens) wakes the queue when the next token is due. Time is tokio's, so the limiter is
//! tested with paused time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// AssumeRole calls per second once the burst is spent.
pub const DEFAULT_RATE: f64 = 50.0;
/// Calls that may go at once after a quiet spell.
pub const DEFAULT_BURST: u32 = 100;
/// Calls in flight at once.
pub const DEFAULT_CONCURRENCY: u32 = 32;

const MAX_RATE: f64 = 10_000.0;
const MAX_BURST: u32 = 10_000;
const MAX_CONCURRENCY: u32 = 1_024;

/// Rounding slack when comparing fractional tokens.
const EPSILON: f64 = 1e-9;

/// How many AssumeRole calls may be made, and how fast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterOptions {
    /// Calls per second, sustained (`--sts-max-rate`).
    pub rate: f64,
    /// Calls allowed at once after a quiet spell (`--sts-burst`).
    pub burst: u32,
    /// Calls in flight at once (`--sts-max-concurrency`).
    pub concurrency: u32,
}

impl Default for LimiterOptions {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

impl LimiterOptions {
    /// `--sts-max-rate`: a positive number of calls per second (fractions allowed).
    pub fn parse_rate(s: &str) -> Result<f64, String> {
        match s.trim().parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 && r <= MAX_RATE => Ok(r),
            _ => Err(format!(
                "{s:?} is not a rate of AssumeRole calls per second; write a number above 0 and up \
                 to {MAX_RATE} such as {DEFAULT_RATE} (0.5 is one call every two seconds)"
            )),
        }
    }

    /// `--sts-burst`: a whole number of calls, at least 1.
    pub fn parse_burst(s: &str) -> Result<u32, String> {
        match s.trim().parse::<u32>() {
            Ok(b) if (1..=MAX_BURST).contains(&b) => Ok(b),
            _ => Err(format!(
                "{s:?} is not a number of AssumeRole calls; write a whole number from 1 to \
                 {MAX_BURST} such as {DEFAULT_BURST}: the calls that may go at once after a quiet \
                 spell"
            )),
        }
    }

    /// `--sts-max-concurrency`: a whole number of calls in flight, at least 1.
    pub fn parse_concurrency(s: &str) -> Result<u32, String> {
        match s.trim().parse::<u32>() {
            Ok(c) if (1..=MAX_CONCURRENCY).contains(&c) => Ok(c),
            _ => Err(format!(
                "{s:?} is not a number of AssumeRole calls in flight; write a whole number from 1 \
                 to {MAX_CONCURRENCY} such as {DEFAULT_CONCURRENCY}"
            )),
        }
    }
}

/// Who is waiting for a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A caller's request waits for it.
    Caller,
    /// Nobody waits: prefetch, refresh ahead, a retry.
    Background,
}

/// One fetch's place in the limiter, made when the fetch starts, so that it can be promoted
/// ([`Limiter::promote`]) before, while or after it queues.
#[derive(Debug, Clone)]
pub struct Ticket(Arc<Waiter>);

#[derive(Debug)]
struct Waiter {
    /// Caller priority. Written under the limiter's lock.
    urgent: AtomicBool,
    /// Set under the limiter's lock when the call may go; the permit is then the waiter's.
    granted: AtomicBool,
    wake: Notify,
}

impl Ticket {
    pub fn new(priority: Priority) -> Self {
        Ticket(Arc::new(Waiter {
            urgent: AtomicBool::new(priority == Priority::Caller),
            granted: AtomicBool::new(false),
            wake: Notify::new(),
        }))
    }

    pub fn priority(&self) -> Priority {
        if self.0.urgent.load(Ordering::Acquire) {
            Priority::Caller
        } else {
            Priority::Background
        }
    }
}

/// What the limiter has done and is doing, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimiterSnapshot {
    /// Calls queued now, by priority.
    pub waiting_caller: usize,
    pub waiting_background: usize,
    /// Calls in flight now.
    pub in_flight: usize,
    /// Calls let through so far, by the priority they had when they went.
    pub admitted_caller: u64,
    pub admitted_background: u64,
    /// Time those calls spent queued, in total.
    pub waited_caller: Duration,
    pub waited_background: Duration,
}

/// Cheap to clone; clones share one bucket and one queue.
#[derive(Clone)]
pub struct Limiter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

struct Shared {
    options: LimiterOptions,
    state: Mutex<State>,
    /// Where the timer task runs (the runtime the limiter was made in).
    runtime: tokio::runtime::Handle,
    admitted: [AtomicU64; 2],
    waited_nanos: [AtomicU64; 2],
}

struct State {
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
    urgent: VecDeque<Ticket>,
    background: VecDeque<Ticket>,
    timer_armed: bool,
}

/// The right to make one call; dropping it lets the next one go.
#[derive(Debug)]
pub struct Permit {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// A limiter with a full bucket. Must be called inside a tokio runtime.
    pub fn new(options: LimiterOptions) -> Self {
        Limiter {
            shared: Arc::new(Shared {
                options,
                state: Mutex::new(State {
                    tokens: f64::from(options.burst),
                    refilled: Instant::now(),
                    in_flight: 0,
                    urgent: VecDeque::new(),
                    background: VecDeque::new(),
                    timer_armed: false,
                }),
                runtime: tokio::runtime::Handle::current(),
                admitted: [AtomicU64::new(0), AtomicU64::new(0)],
                waited_nanos: [AtomicU64::new(0), AtomicU64::new(0)],
            }),
        }
    }

    pub fn options(&self) -> LimiterOptions {
        self.shared.options
    }

    /// Waits until `ticket`'s call may go. Dropping the future leaves the queue (or, if the call
    /// had just been let through, gives its place back).
    pub async fn acquire(&self, ticket: Ticket) -> Permit {
        let queued_at = Instant::now();
        let mut queued = Queued {
            shared: &self.shared,
            ticket: &ticket,
            done: false,
        };
        {
            let mut state = self.shared.lock();
            if ticket.0.urgent.load(Ordering::Acquire) {
                state.urgent.push_back(ticket.clone());
            } else {
                state.background.push_back(ticket.clone());
            }
            self.shared.dispatch(&mut state);
        }
        while !ticket.0.granted.load(Ordering::Acquire) {
            ticket.0.wake.notified().await;
        }
        queued.done = true;
        let class = usize::from(ticket.priority() == Priority::Background);
        let waited = u64::try_from(queued_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shared.admitted[class].fetch_add(1, Ordering::Relaxed);
        self.shared.waited_nanos[class].fetch_add(waited, Ordering::Relaxed);
        Permit {
            shared: self.shared.clone(),
        }
    }

    /// Gives `ticket` caller priority: a caller now waits for its fetch. If it is queued behind
    /// background calls it moves to the back of the callers' queue; if it has not queued yet it
    /// will queue there; if its call has gone already, nothing changes.
    pub fn promote(&self, ticket: &Ticket) {
        let mut state = self.shared.lock();
        if ticket.0.urgent.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(at) = state
            .background
            .iter()
            .position(|t| Arc::ptr_eq(&t.0, &ticket.0))
        {
            state.background.remove(at);
            state.urgent.push_back(ticket.clone());
        }
    }

    pub fn snapshot(&self) -> LimiterSnapshot {
        let (waiting_caller, waiting_background, in_flight) = {
            let state = self.shared.lock();
            (state.urgent.len(), state.background.len(), state.in_flight)
        };
        let nanos =
            |i: usize| Duration::from_nanos(self.shared.waited_nanos[i].load(Ordering::Relaxed));
        LimiterSnapshot {
            waiting_caller,
            waiting_background,
            in_flight,
            admitted_caller: self.shared.admitted[0].load(Ordering::Relaxed),
            admitted_background: self.shared.admitted[1].load(Ordering::Relaxed),
            waited_caller: nanos(0),
            waited_background: nanos(1),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Only plain counters and queues are behind it; keep going after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets through as many queued calls as the bucket and the in-flight cap allow, callers first,
    /// and arms the timer when calls are left waiting for tokens.
    fn dispatch(self: &Arc<Self>, state: &mut State) {
        let now = Instant::now();
        let burst = f64::from(self.options.burst);
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.options.rate).min(burst);
        state.refilled = now;
        let cap = usize::try_from(self.options.concurrency).unwrap_or(usize::MAX);
        while state.in_flight < cap && state.tokens >= 1.0 - EPSILON {
            let Some(next) = state
                .urgent
                .pop_front()
                .or_else(|| state.background.pop_front())
            else {
                break;
            };
            state.tokens = (state.tokens - 1.0).max(0.0);
            state.in_flight += 1;
            next.0.granted.store(true, Ordering::Release);
            next.0.wake.notify_one();
        }
        let waiting = !state.urgent.is_empty() || !state.background.is_empty();
        // A full in-flight cap needs no timer: the next permit dropped dispatches again.
        if waiting && state.in_flight < cap && !state.timer_armed {
            state.timer_armed = true;
            let due = Duration::from_secs_f64((1.0 - state.tokens).max(0.0) / self.options.rate)
                + Duration::from_micros(1);
            let shared = Arc::downgrade(self);
            self.runtime.spawn(timer(shared, due));
        }
    }

    fn release(self: &Arc<Self>) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        self.dispatch(&mut state);
    }
}

/// Wakes the queue when the next token is due; re-armed by `dispatch` while calls still wait.
async fn timer(shared: Weak<Shared>, due: Duration) {
    tokio::time::sleep(due).await;
    if let Some(shared) = shared.upgrade() {
        let mut state = shared.lock();
        state.timer_armed = false;
        shared.dispatch(&mut state);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.release();
    }
}

/// A waiter's place while it waits; dropped early (the fetch was cancelled), it cleans up.
struct Queued<'a> {
    shared: &'a Arc<Shared>,
    ticket: &'a Ticket,
    done: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.shared.lock();
        if self.ticket.0.granted.load(Ordering::Acquire) {
            // Let through but never used: the place and the token go back.
            state.in_flight = state.in_flight.saturating_sub(1);
            state.tokens = (state.tokens + 1.0).min(f64::from(self.shared.options.burst));
        } else {
            let ticket = &self.ticket.0;
            state.urgent.retain(|t| !Arc::ptr_eq(&t.0, ticket));
            state.background.retain(|t| !Arc::ptr_eq(&t.0, ticket));
        }
        self.shared.dispatch(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    fn limiter(rate: f64, burst: u32, concurrency: u32) -> Limiter {
        Limiter::new(LimiterOptions {
            rate,
            burst,
            concurrency,
        })
    }

    /// Lets spawned tasks run without moving paused time.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Starts a task that acquires with `priority`, records `(name, when)` on admission, holds
    /// the permit for `hold`, and returns.
    fn call(
        limiter: &Limiter,
        ticket: Ticket,
        name: &'static str,
        hold: Duration,
        log: &Arc<StdMutex<Vec<(&'static str, Instant)>>>,
    ) -> tokio::task::JoinHandle<()> {
        let (limiter, log) = (limiter.clone(), log.clone());
        tokio::spawn(async move {
            let _permit = limiter.acquire(ticket).await;
            log.lock().expect("lock").push((name, Instant::now()));
            tokio::time::sleep(hold).await;
        })
    }

    fn new_log() -> Arc<StdMutex<Vec<(&'static str, Instant)>>> {
        Arc::new(StdMutex::new(Vec::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_calls_follow_the_rate() {
        let l = limiter(10.0, 5, 100);
        let log = new_log();
        let start = Instant::now();
        let tasks: Vec<_> = (0..25)
            .map(|_| {
                call(
                    &l,
                    Ticket::new(Priority::Background),
                    "c",
                    Duration::ZERO,
                    &log,
                )
            })
            .collect();
        for t in tasks {
            t.await.expect("join");
        }
        let times: Vec<Duration> = log
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, at)| *at - start)
            .collect();
        assert_eq!(times.len(), 25);
        assert!(times[..5].iter().all(|t| t.is_zero()), "{times:?}");
        // Then one every 100 ms: the 20 after the burst take two seconds.
        let last = times[24];
        assert!(
            last >= Duration::from_millis(1_990) && last <= Duration::from_millis(2_010),
            "{last:?}"
        );
        // In any window of one second, at most burst + rate calls.
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .filter(|u| **u < *t + Duration::from_secs(1))
                .count();
            assert!(
                in_window <= 15,
                "{in_window} calls within a second of {t:?}"
            );
        }
        let s = l.snapshot();
        assert_eq!(s.admitted_background, 25);
        assert!(s.waited_background >= Duration::from_secs(20), "{s:?}");
        assert_eq!((s.waiting_background, s.in_flight), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_refills_the_burst_and_no_more() {
        let l = limiter(1.0, 3, 100);
        for _ in 0..3 {
            drop(l.acquire(Ticket::new(Priority::Background)).await);
        }
        tokio::time::advance(Duration::from_secs(3600)).await;
        let start = Instant::now();
        for _ in 0..3 {
            drop(l.acquire(Ticket::new(Priority::Background)).await);
        }
        assert_eq!(Instant::now(), start, "three tokens after an hour, at once");
        drop(l.acquire(Ticket::new(Priority::Background)).await);
        assert!(
            Instant::now() - start >= Duration::from_millis(999),
            "but not a fourth"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_concurrency_are_in_flight() {
        let l = limiter(1_000.0, 1_000, 3);
        let running = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (l, running, most) = (l.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    let _permit = l.acquire(Ticket::new(Priority::Background)).await;
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        settle().await;
        assert_eq!(l.snapshot().in_flight, 3);
        assert_eq!(l.snapshot().waiting_background, 17);
        for t in tasks {
            t.await.expect("join");
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert_eq!(l.snapshot().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_go_before_background_calls_queued_earlier() {
        let l = limiter(10.0, 1, 100);
        let log = new_log();
        // The one token goes to the first background call; the rest queue.
        let mut tasks = vec![call(
            &l,
            Ticket::new(Priority::Background),
            "b0",
            Duration::ZERO,
            &log,
        )];
        settle().await;
        for name in ["b1", "b2", "b3"] {
            tasks.push(call(
                &l,
                Ticket::new(Priority::Background),
                name,
                Duration::ZERO,
                &log,
            ));
            settle().await;
        }
        tasks.push(call(
            &l,
            Ticket::new(Priority::Caller),
            "caller",
            Duration::ZERO,
            &log,
        ));
        settle().await;
        assert_eq!(l.snapshot().waiting_caller, 1);
        assert_eq!(l.snapshot().waiting_background, 3);
        for t in tasks {
            t.await.expect("join");
        }
        let order: Vec<&str> = log.lock().expect("lock").iter().map(|(n, _)| *n).collect();
        assert_eq!(order, ["b0", "caller", "b1", "b2", "b3"]);
        let s = l.snapshot();
        assert_eq!((s.admitted_caller, s.admitted_background), (1, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn callers_go_before_background_calls_when_a_place_frees_up() {
        let l = limiter(1_000.0, 1_000, 1);
        let log = new_log();
        let mut tasks = Vec::new();
        for name in ["b0", "b1", "b2"] {
            tasks.push(call(
                &l,
                Ticket::new(Priority::Background),
                name,
                Duration::from_millis(100),
                &log,
            ));
            settle().await;
        }
        tasks.push(call(
            &l,
            Ticket::new(Priority::Caller),
            "caller",
            Duration::from_millis(100),
            &log,
        ));
        for t in tasks {
            t.await.expect("join");
        }
        let order: Vec<&str> = log.lock().expect("lock").iter().map(|(n, _)| *n).collect();
        assert_eq!(order, ["b0", "caller", "b1", "b2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_background_call_that_a_caller_waits_for_is_promoted() {
        let l = limiter(10.0, 1, 100);
        let log = new_log();
        let mut tasks = vec![call(
            &l,
            Ticket::new(Priority::Background),
            "b0",
            Duration::ZERO,
            &log,
        )];
        settle().await;
        let mut tickets = Vec::new();
        for name in ["b1", "b2", "b3"] {
            let t = Ticket::new(Priority::Background);
            tickets.push(t.clone());
            tasks.push(call(&l, t, name, Duration::ZERO, &log));
            settle().await;
        }
        // A caller queued before the promotion keeps its place ahead of it.
        tasks.push(call(
            &l,
            Ticket::new(Priority::Caller),
            "caller",
            Duration::ZERO,
            &log,
        ));
        settle().await;
        // A caller starts waiting for b3's fetch.
        l.promote(&tickets[2]);
        assert_eq!(tickets[2].priority(), Priority::Caller);
        assert_eq!(l.snapshot().waiting_caller, 2);
        assert_eq!(l.snapshot().waiting_background, 2);
        // Promoting twice changes nothing.
        l.promote(&tickets[2]);
        assert_eq!(l.snapshot().waiting_caller, 2);
        for t in tasks {
            t.await.expect("join");
        }
        let order: Vec<&str> = log.lock().expect("lock").iter().map(|(n, _)| *n).collect();
        assert_eq!(order, ["b0", "caller", "b3", "b1", "b2"]);
        let s = l.snapshot();
        assert_eq!((s.admitted_caller, s.admitted_background), (2, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ticket_promoted_before_it_queues_queues_with_the_callers() {
        let l = limiter(10.0, 1, 100);
        let log = new_log();
        let mut tasks = vec![call(
            &l,
            Ticket::new(Priority::Background),
            "b0",
            Duration::ZERO,
            &log,
        )];
        settle().await;
        tasks.push(call(
            &l,
            Ticket::new(Priority::Background),
            "b1",
            Duration::ZERO,
            &log,
        ));
        settle().await;
        let early = Ticket::new(Priority::Background);
        l.promote(&early);
        tasks.push(call(&l, early, "promoted", Duration::ZERO, &log));
        for t in tasks {
            t.await.expect("join");
        }
        let order: Vec<&str> = log.lock().expect("lock").iter().map(|(n, _)| *n).collect();
        assert_eq!(order, ["b0", "promoted", "b1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let l = limiter(10.0, 1, 100);
        let log = new_log();
        let first = call(
            &l,
            Ticket::new(Priority::Background),
            "b0",
            Duration::ZERO,
            &log,
        );
        settle().await;
        let cancelled = call(
            &l,
            Ticket::new(Priority::Caller),
            "gone",
            Duration::ZERO,
            &log,
        );
        let kept = call(
            &l,
            Ticket::new(Priority::Background),
            "b1",
            Duration::ZERO,
            &log,
        );
        settle().await;
        assert_eq!(l.snapshot().waiting_caller, 1);
        cancelled.abort();
        settle().await;
        let s = l.snapshot();
        assert_eq!((s.waiting_caller, s.waiting_background), (0, 1), "{s:?}");
        let started = Instant::now();
        first.await.expect("join");
        kept.await.expect("join");
        // The next token (100 ms after the first) went to the call still waiting.
        assert!(Instant::now() - started <= Duration::from_millis(101));
        let order: Vec<&str> = log.lock().expect("lock").iter().map(|(n, _)| *n).collect();
        assert_eq!(order, ["b0", "b1"]);
        assert_eq!(l.snapshot().admitted_caller, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_let_through_but_cancelled_gives_its_place_back() {
        let l = limiter(1.0, 2, 1);
        let holder = l.acquire(Ticket::new(Priority::Background)).await;
        let ticket = Ticket::new(Priority::Background);
        {
            let fut = l.acquire(ticket.clone());
            tokio::pin!(fut);
            assert!(
                futures::poll!(fut.as_mut()).is_pending(),
                "the one place is taken"
            );
            // The place frees up and goes to the waiter, which is dropped before it runs again.
            drop(holder);
            assert!(ticket.0.granted.load(Ordering::SeqCst));
        }
        let s = l.snapshot();
        assert_eq!((s.in_flight, s.waiting_background), (0, 0), "{s:?}");
        // Its token is back too: the next call goes at once.
        let start = Instant::now();
        drop(l.acquire(Ticket::new(Priority::Background)).await);
        assert_eq!(Instant::now(), start);
    }

    #[test]
    fn options_are_checked_with_the_fix_in_the_message() {
        assert_eq!(LimiterOptions::parse_rate("50"), Ok(50.0));
        assert_eq!(LimiterOptions::parse_rate(" 0.5 "), Ok(0.5));
        for bad in ["0", "-1", "NaN", "inf", "fast", "", "20000"] {
            let e = LimiterOptions::parse_rate(bad).expect_err(bad);
            assert!(
                e.contains("calls per second") && e.contains("such as"),
                "{e}"
            );
        }
        assert_eq!(LimiterOptions::parse_burst("100"), Ok(100));
        for bad in ["0", "-3", "1.5", "100000"] {
            let e = LimiterOptions::parse_burst(bad).expect_err(bad);
            assert!(e.contains("whole number from 1"), "{e}");
        }
        assert_eq!(LimiterOptions::parse_concurrency("32"), Ok(32));
        for bad in ["0", "many", "5000"] {
            let e = LimiterOptions::parse_concurrency(bad).expect_err(bad);
            assert!(
                e.contains("in flight") && e.contains("whole number from 1"),
                "{e}"
            );
        }
    }
}
