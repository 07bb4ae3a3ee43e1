//! The container index: which running container owns which IP address, mirrored from the Docker
//! Engine by the watcher in [`crate::docker`]. Pure data and notifications; no I/O.
//!
//! One [`IndexWriter`] applies changes; any number of cheap [`Index`] readers look callers up.
//! Every change bumps a generation and wakes waiters, so a request from an address the index does
//! not know yet can wait for the watcher (bounded) instead of polling.
//!
//! While the engine cannot be reached the index keeps its entries but is not *ready*: a container
//! could stop and another take its address without imdsd seeing it, so callers are not served from
//! it until the next full sync (see [`Index::lookup_or_wait`]).
//!
//! Safety rule: an address belongs to exactly one container incarnation (id + start time). When a
//! container is removed, its addresses are released only if they still point at it, so a late event
//! for a dead container can never take an address away from the live one that reused it, and a new
//! container on a recycled address replaces the old mapping outright.
//!
//! Doubt: an address whose owner the index is no longer sure of (its container lost another
//! address to a newcomer before it was seen to stop, or an event about it was not understood) is
//! *in doubt*: it is looked up as nobody's until the watcher has asked the engine again. A caller
//! the index cannot place (an address in a served network that no known container owns) makes the
//! index [`ask`](Index::ask) the watcher to look now, rather than only wait for an event: some
//! engines (Podman) deliver events a quarter of a second late.
//!
//! Exits: the engine's events may come late (Podman's by a quarter of a second, Docker's behind
//! a backlog of re-inspections), and a container removed while running can be followed on its
//! address by a new one that asks before the old one's `die` is applied. So each container
//! incarnation has a [`Liveness`], which `crate::liveness` sets the moment the kernel says its
//! init process exited: an exited owner's addresses are looked up as nobody's, like an owner in
//! doubt, and the watcher is asked to look. (The engine frees an address only after its
//! container's init has exited, so the mark always comes first.)

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{Notify, broadcast};

/// What imdsd knows about one running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The full 64-character id.
    pub id: String,
    /// The name, without Docker's leading `/`.
    pub name: String,
    /// `State.StartedAt`: with the id, identifies this run of the container.
    pub started_at: String,
    pub image: String,
    /// Every address on every network, IPv4 and IPv6.
    pub addresses: Vec<IpAddr>,
    /// Names of the networks the container is attached to.
    pub networks: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Only the environment variables imdsd reads (role, external id, policy, session key).
    pub env: BTreeMap<String, String>,
}

impl Container {
    /// The 12-character id Docker shows.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }

    /// What IMDSv2 tokens issued to this container are bound to: a token is worthless to any other
    /// container, including a later one on the same address.
    pub fn binding(&self) -> String {
        format!("ctr:{}:{}", self.id, self.started_at)
    }
}

/// Who a caller is, as far as the index can tell.
#[derive(Debug, Clone)]
pub enum Lookup {
    Container(Arc<Container>),
    /// Outside every container network, or a network's gateway: the host or another machine.
    NotAContainer,
    /// Inside a container network, but no running container (that imdsd serves) has the address.
    UnknownContainer,
    /// Inside a Docker network that imdsd does not serve (one the operator did not attach to the
    /// metadata service): a container, but never one that gets a role, whoever it is.
    Unserved(Arc<str>),
    /// The index has not completed its first sync with the engine, so nobody can be told apart.
    NotSynced,
}

/// A change to apply.
#[derive(Debug, Clone)]
pub enum Change {
    /// A container started, changed networks, or was renamed: what the engine says of it now.
    Upsert(Container),
    /// A container stopped or disappeared.
    Remove { id: String },
    /// A full listing: replaces everything (after a (re)connect or a periodic resync).
    Replace(Vec<Container>),
    /// Something happened to this container that the index cannot judge (an event it does not
    /// understand): its addresses are nobody's until the engine is asked about it again.
    Doubt { id: String },
}

/// What readers can subscribe to, e.g. to prefetch credentials for new containers.
#[derive(Debug, Clone)]
pub enum IndexEvent {
    Added(Arc<Container>),
    Removed(Arc<Container>),
    /// Many changes at once (a resync); subscribers should re-read the whole index.
    Reset,
}

/// One subnet of a Docker network in view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    /// The network's name.
    pub network: Arc<str>,
    pub net: IpNet,
    /// The network's gateway on this subnet: the host itself, never a container.
    pub gateway: Option<IpAddr>,
    /// Whether containers calling from this subnet are served (see `crate::docker::NetworkScope`).
    pub served: bool,
}

#[derive(Default)]
struct State {
    /// Looked up on every request from a container: hashed with foldhash (seeded per process),
    /// as the identity memo is.
    by_ip: foldhash::HashMap<IpAddr, Owner>,
    by_id: HashMap<String, Arc<Container>>,
    /// Each indexed incarnation's [`Liveness`], by [`Container::binding`].
    liveness: HashMap<String, Arc<Liveness>>,
    /// The subnets of the Docker networks in view.
    subnets: Vec<Subnet>,
}

impl State {
    /// The subnet `ip` belongs to as a container address (a gateway is the host, not a container).
    fn container_subnet(&self, ip: IpAddr) -> Option<&Subnet> {
        if self.subnets.iter().any(|s| s.gateway == Some(ip)) {
            return None;
        }
        // A served subnet first: should two networks' subnets overlap, serving is decided by the
        // one that serves (its containers are in the index; anything else there is unknown).
        self.subnets
            .iter()
            .filter(|s| s.net.contains(&ip))
            .max_by_key(|s| s.served)
    }
}

/// The container an address belongs to.
struct Owner {
    container: Arc<Container>,
    /// The index is not sure the address is still this container's: it is nobody's until the
    /// engine has been asked (see the module notes).
    in_doubt: bool,
    liveness: Arc<Liveness>,
}

impl Owner {
    /// Whether the address is this container's beyond doubt: not in doubt, and its init process
    /// not seen to exit.
    fn sure(&self) -> bool {
        !self.in_doubt && !self.liveness.exited()
    }
}

/// What the kernel says of one container incarnation's init process (see `crate::liveness`).
#[derive(Debug, Default)]
pub struct Liveness {
    exited: AtomicBool,
    watched: AtomicBool,
}

impl Liveness {
    /// Records that the init process exited: from now on the container's addresses are nobody's
    /// (until the engine has been asked who holds them).
    pub fn set_exited(&self) {
        self.exited.store(true, Ordering::Release);
    }

    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }
}

struct Shared {
    state: RwLock<State>,
    /// Addresses callers came from that the index could not place, for the watcher to look up.
    asks: Mutex<Vec<IpAddr>>,
    asked: Notify,
    /// Callers the index could not place when they asked (see [`Index::unplaced_callers`]).
    unplaced: AtomicU64,
    changed: Notify,
    generation: AtomicU64,
    ready: AtomicBool,
    ready_notify: Notify,
    events: broadcast::Sender<IndexEvent>,
}

/// The read side. Cheap to clone.
#[derive(Clone)]
pub struct Index {
    shared: Arc<Shared>,
}

/// The write side; there is one, owned by the watcher.
pub struct IndexWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("containers", &self.len())
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// Addresses waiting to be looked up by the watcher, at most.
const MAX_ASKS: usize = 256;

/// A new, empty index and its writer.
pub fn index() -> (Index, IndexWriter) {
    let (events, _) = broadcast::channel(1024);
    let shared = Arc::new(Shared {
        state: RwLock::new(State::default()),
        asks: Mutex::new(Vec::new()),
        asked: Notify::new(),
        unplaced: AtomicU64::new(0),
        changed: Notify::new(),
        generation: AtomicU64::new(0),
        ready: AtomicBool::new(false),
        ready_notify: Notify::new(),
        events,
    });
    (
        Index {
            shared: shared.clone(),
        },
        IndexWriter { shared },
    )
}

impl Index {
    /// The container that owns `ip`, if the index knows one.
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<Container>> {
        self.read()
            .by_ip
            .get(&ip.to_canonical())
            .filter(|o| o.sure())
            .map(|o| o.container.clone())
    }

    /// Wakes everyone waiting for a change, and connections that remember their caller look it
    /// up again: for what changes outside the writer (a container's exit, see [`Liveness`]).
    pub fn wake(&self) {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.changed.notify_waiters();
    }

    /// Asks the watcher to find out now who owns `ip` (an address in a served network that the
    /// index cannot place), instead of waiting for the engine's next event. Asks are merged; the
    /// watcher answers them at a bounded rate.
    pub fn ask(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        {
            let mut asks = self.shared.asks.lock().unwrap_or_else(|e| e.into_inner());
            if asks.contains(&ip) {
                return;
            }
            // Bounded: a flood of strangers cannot grow it; the watcher's look finds them all.
            if asks.len() < MAX_ASKS {
                asks.push(ip);
            }
        }
        self.shared.asked.notify_one();
    }

    pub fn get(&self, id: &str) -> Option<Arc<Container>> {
        self.read().by_id.get(id).cloned()
    }

    /// Finds who is calling from `ip`, waiting up to `timeout` while the answer may still change:
    /// while the index has not finished its first sync, or while `ip` lies in a container network
    /// but belongs to no known container (it may have just started; its event is on the way).
    /// Wakes on index changes, not on a timer.
    pub async fn lookup_or_wait(&self, ip: IpAddr, timeout: Duration) -> Lookup {
        let ip = ip.to_canonical();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut asked = false;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let ready = self.is_ready();
            if ready && let Some(c) = self.lookup(ip) {
                return Lookup::Container(c);
            }
            if ready {
                match self.container_subnet(ip) {
                    None => return Lookup::NotAContainer,
                    // Nothing to wait for: no container there is ever served.
                    Some(s) if !s.served => return Lookup::Unserved(s.network),
                    Some(_) if !asked => {
                        // A container the index does not know (yet), or no longer trusts.
                        self.shared.unplaced.fetch_add(1, Ordering::Relaxed);
                        self.ask(ip);
                        asked = true;
                    }
                    Some(_) => {}
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                if !self.is_ready() {
                    return Lookup::NotSynced;
                }
                return match self.lookup(ip) {
                    Some(c) => Lookup::Container(c),
                    None => match self.container_subnet(ip) {
                        Some(s) if !s.served => Lookup::Unserved(s.network),
                        Some(_) => Lookup::UnknownContainer,
                        None => Lookup::NotAContainer,
                    },
                };
            }
        }
    }

    /// True when `ip` lies in a Docker network's subnet and is not its gateway: such a caller is a
    /// container, known or not, and must never be mistaken for the host.
    pub fn is_container_address(&self, ip: IpAddr) -> bool {
        self.container_subnet(ip).is_some()
    }

    /// The subnet `ip` lies in as a container address, if any.
    fn container_subnet(&self, ip: IpAddr) -> Option<Subnet> {
        self.read().container_subnet(ip.to_canonical()).cloned()
    }

    /// The subnets of the Docker networks in view, for the admin API and doctor.
    pub fn subnets(&self) -> Vec<Subnet> {
        self.read().subnets.clone()
    }

    /// The container that held `ip` when the index fell in doubt about it (or saw its init
    /// exit), if it is.
    pub fn owner_in_doubt(&self, ip: IpAddr) -> Option<Arc<Container>> {
        self.read()
            .by_ip
            .get(&ip.to_canonical())
            .filter(|o| !o.sure())
            .map(|o| o.container.clone())
    }

    /// How many callers the index could not place when they asked, and asked the watcher about:
    /// containers that asked before their start event came, or on an address in doubt (for
    /// tests).
    pub fn unplaced_callers(&self) -> u64 {
        self.shared.unplaced.load(Ordering::Relaxed)
    }

    /// Whether the owner of `ip` is in doubt, or exited (for the admin API and tests).
    pub fn in_doubt(&self, ip: IpAddr) -> bool {
        self.read()
            .by_ip
            .get(&ip.to_canonical())
            .is_some_and(|o| !o.sure())
    }

    /// Every container, for the admin API and resubscribers.
    pub fn containers(&self) -> Vec<Arc<Container>> {
        self.read().by_id.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bumped on every change.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// True while the index mirrors the engine: after a full listing, until the connection to the
    /// engine is lost.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Waits until the first full listing has been applied.
    pub async fn wait_ready(&self) {
        loop {
            let notified = self.shared.ready_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<IndexEvent> {
        self.shared.events.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl IndexWriter {
    /// Applies one change and wakes everyone waiting for one. Returns the ids of containers
    /// the index is now in doubt about, for the watcher to ask the engine about again.
    #[must_use = "the engine must be asked again about the containers in doubt"]
    pub fn apply(&mut self, change: Change) -> Vec<String> {
        let mut events = Vec::new();
        let mut doubtful = Vec::new();
        {
            let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
            match change {
                Change::Upsert(container) => {
                    let container = Arc::new(container);
                    match remove(&mut state, &container.id) {
                        Some(old) if *old == *container => {
                            // Nothing changed; keep the existing entry and its identity (and
                            // what the engine just said settles any doubt about it).
                            insert(&mut state, old);
                        }
                        Some(old) => {
                            if old.binding() != container.binding() {
                                state.liveness.remove(&old.binding());
                            }
                            events.push(IndexEvent::Removed(old));
                            events.push(IndexEvent::Added(container.clone()));
                            insert(&mut state, container.clone());
                        }
                        None => {
                            events.push(IndexEvent::Added(container.clone()));
                            insert(&mut state, container.clone());
                        }
                    }
                    // The engine gives an address to one running container: if another still
                    // held it here, that one stopped unseen, and what else it holds is suspect.
                    let displaced: Vec<Arc<Container>> = state
                        .by_id
                        .values()
                        .filter(|c| {
                            c.id != container.id
                                && c.addresses.iter().any(|a| container.addresses.contains(a))
                        })
                        .cloned()
                        .collect();
                    for d in displaced {
                        tracing::warn!(
                            container = %d.name,
                            id = %d.short_id(),
                            now = %container.name,
                            "an address moved to another container before its previous owner was seen to stop; its other addresses are not served until the engine confirms it"
                        );
                        doubt(&mut state, &d.id);
                        doubtful.push(d.id.clone());
                    }
                }
                Change::Remove { id } => {
                    if let Some(old) = remove(&mut state, &id) {
                        state.liveness.remove(&old.binding());
                        events.push(IndexEvent::Removed(old));
                    }
                }
                Change::Replace(containers) => {
                    state.by_ip.clear();
                    state.by_id.clear();
                    // The incarnations listed again keep what the kernel said of them.
                    let listed: std::collections::HashSet<String> =
                        containers.iter().map(Container::binding).collect();
                    state.liveness.retain(|binding, _| listed.contains(binding));
                    for c in containers {
                        insert(&mut state, Arc::new(c));
                    }
                    events.push(IndexEvent::Reset);
                }
                Change::Doubt { id } => {
                    if doubt(&mut state, &id) {
                        doubtful.push(id);
                    }
                }
            }
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.changed.notify_waiters();
        for e in events {
            // Nobody listening is fine.
            let _ = self.shared.events.send(e);
        }
        doubtful
    }

    /// The [`Liveness`] of container `c`'s incarnation, for the one who will watch its init
    /// process: `None` if it is not in the index, or already watched.
    pub fn liveness_to_watch(&self, c: &Container) -> Option<Arc<Liveness>> {
        let state = self.shared.state.read().unwrap_or_else(|e| e.into_inner());
        let liveness = state.liveness.get(&c.binding())?;
        (!liveness.watched.swap(true, Ordering::AcqRel)).then(|| liveness.clone())
    }

    /// Waits until a reader [asks](Index::ask) about an address (returns at once if one did
    /// since the last [`IndexWriter::take_asks`]).
    pub async fn asked(&self) {
        self.shared.asked.notified().await;
    }

    /// The addresses readers asked about since the last call.
    pub fn take_asks(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut *self.shared.asks.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records the subnets of the Docker networks in view, and wakes waiters: a caller waiting
    /// on an address may now turn out to be on a network that is not served.
    pub fn set_networks(&mut self, subnets: Vec<Subnet>) {
        {
            let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
            state.subnets = subnets
                .into_iter()
                .map(|s| Subnet {
                    gateway: s.gateway.map(|g| g.to_canonical()),
                    ..s
                })
                .collect();
        }
        self.shared.changed.notify_waiters();
    }

    /// Marks the index as synced (after the first full listing).
    pub fn set_ready(&mut self) {
        self.shared.ready.store(true, Ordering::Release);
        self.shared.ready_notify.notify_waiters();
        self.shared.changed.notify_waiters();
    }

    /// Marks the index as no longer authoritative (the engine connection was lost): while it
    /// cannot see events, a container may die and another take its address unseen.
    pub fn set_unready(&mut self) {
        self.shared.ready.store(false, Ordering::Release);
        self.shared.changed.notify_waiters();
    }

    /// A reader for this index.
    pub fn reader(&self) -> Index {
        Index {
            shared: self.shared.clone(),
        }
    }
}

/// Adds `c`, which owns its addresses from now on, certainly (unless its init was seen to exit).
fn insert(state: &mut State, c: Arc<Container>) {
    let liveness = state.liveness.entry(c.binding()).or_default().clone();
    for ip in &c.addresses {
        state.by_ip.insert(
            ip.to_canonical(),
            Owner {
                container: c.clone(),
                in_doubt: false,
                liveness: liveness.clone(),
            },
        );
    }
    state.by_id.insert(c.id.clone(), c);
}

/// Removes the container `id`, releasing only the addresses that still point at it.
fn remove(state: &mut State, id: &str) -> Option<Arc<Container>> {
    let old = state.by_id.remove(id)?;
    for ip in &old.addresses {
        let ip = ip.to_canonical();
        if state
            .by_ip
            .get(&ip)
            .is_some_and(|o| o.container.id == old.id)
        {
            state.by_ip.remove(&ip);
        }
    }
    Some(old)
}

/// Puts the addresses container `id` still owns in doubt; false if it owns none.
fn doubt(state: &mut State, id: &str) -> bool {
    let Some(c) = state.by_id.get(id).cloned() else {
        return false;
    };
    let mut any = false;
    for ip in &c.addresses {
        if let Some(o) = state.by_ip.get_mut(&ip.to_canonical())
            && o.container.id == c.id
        {
            o.in_doubt = true;
            any = true;
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, started: &str, ips: &[&str]) -> Container {
        Container {
            id: format!("{id:0<64}"),
            name: format!("name-{id}"),
            started_at: started.into(),
            image: "img".into(),
            addresses: ips.iter().map(|i| i.parse().expect("ip")).collect(),
            networks: vec!["net".into()],
            labels: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn subnet(network: &str, net: &str, gateway: &str, served: bool) -> Subnet {
        Subnet {
            network: network.into(),
            net: net.parse().expect("net"),
            gateway: Some(ip(gateway)),
            served,
        }
    }

    /// One container network, 10.0.0.0/16 with its gateway at .1, synced and empty.
    fn synced_on_10_0(w: &mut IndexWriter) {
        w.set_networks(vec![subnet("net", "10.0.0.0/16", "10.0.0.1", true)]);
        let _ = w.apply(Change::Replace(Vec::new()));
        w.set_ready();
    }

    #[test]
    fn upsert_then_remove() {
        let (index, mut w) = index();
        let _ = w.apply(Change::Upsert(container(
            "a",
            "t1",
            &["10.0.0.2", "fd00::2"],
        )));
        assert_eq!(index.lookup(ip("10.0.0.2")).expect("known").name, "name-a");
        assert_eq!(index.lookup(ip("fd00::2")).expect("known").name, "name-a");
        assert_eq!(
            index.lookup(ip("::ffff:10.0.0.2")).expect("mapped v4").name,
            "name-a"
        );
        let _ = w.apply(Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        assert!(index.lookup(ip("10.0.0.2")).is_none());
        assert!(index.is_empty());
    }

    #[test]
    fn a_recycled_address_belongs_to_the_new_container_even_when_the_old_ones_death_arrives_late() {
        let (index, mut w) = index();
        let _ = w.apply(Change::Upsert(container("a", "t1", &["10.0.0.2"])));
        // B starts on A's address before A's removal is processed.
        let _ = w.apply(Change::Upsert(container("b", "t2", &["10.0.0.2"])));
        assert_eq!(index.lookup(ip("10.0.0.2")).expect("known").name, "name-b");
        // A's late removal does not take the address from B.
        let _ = w.apply(Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        assert_eq!(
            index.lookup(ip("10.0.0.2")).expect("still B").name,
            "name-b"
        );
    }

    #[test]
    fn a_container_that_lost_an_address_unseen_is_in_doubt_until_the_engine_answers() {
        let (index, mut w) = index();
        // A holds two addresses; B starts on one of them before A's stop was seen.
        let _ = w.apply(Change::Upsert(container(
            "a",
            "t1",
            &["10.0.0.2", "10.0.1.2"],
        )));
        let doubtful = w.apply(Change::Upsert(container("b", "t2", &["10.0.0.2"])));
        assert_eq!(
            doubtful,
            vec![format!("{:0<64}", "a")],
            "the watcher must ask about A"
        );
        assert_eq!(index.lookup(ip("10.0.0.2")).expect("B's").name, "name-b");
        // A's other address is nobody's until the engine has been asked.
        assert!(index.lookup(ip("10.0.1.2")).is_none());
        assert!(index.in_doubt(ip("10.0.1.2")));
        assert_eq!(
            index.owner_in_doubt(ip("10.0.1.2")).expect("held").name,
            "name-a"
        );
        // The engine says A is gone: its address is released, nothing is in doubt any more.
        let doubtful = w.apply(Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        assert!(doubtful.is_empty());
        assert!(!index.in_doubt(ip("10.0.1.2")));
        assert_eq!(
            index.lookup(ip("10.0.0.2")).expect("still B").name,
            "name-b"
        );
    }

    #[test]
    fn an_event_not_understood_puts_the_container_in_doubt_and_its_record_settles_it() {
        let (index, mut w) = index();
        let a = container("a", "t1", &["10.0.0.2"]);
        let _ = w.apply(Change::Upsert(a.clone()));
        let generation = index.generation();
        let doubtful = w.apply(Change::Doubt { id: a.id.clone() });
        assert_eq!(doubtful, vec![a.id.clone()]);
        assert!(
            index.lookup(ip("10.0.0.2")).is_none(),
            "not served while in doubt"
        );
        assert!(index.generation() > generation, "connections look again");
        // The engine's record, even unchanged, settles it.
        let _ = w.apply(Change::Upsert(a));
        assert_eq!(
            index.lookup(ip("10.0.0.2")).expect("A's again").name,
            "name-a"
        );
        // Doubt about a container the index does not hold is nothing to ask about.
        assert!(w.apply(Change::Doubt { id: "gone".into() }).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_whose_init_exited_is_nobodys_even_before_the_engine_says_so() {
        let (index, mut w) = index();
        synced_on_10_0(&mut w);
        let a = container("a", "t1", &["10.0.0.2"]);
        let _ = w.apply(Change::Upsert(a.clone()));
        let liveness = w
            .liveness_to_watch(&a)
            .expect("in the index, not watched yet");
        assert!(w.liveness_to_watch(&a).is_none(), "watched once");
        // The kernel says A's init exited; the engine's `die` has not come.
        liveness.set_exited();
        assert!(index.lookup(ip("10.0.0.2")).is_none(), "not A's any more");
        assert!(index.in_doubt(ip("10.0.0.2")));
        assert_eq!(index.owner_in_doubt(ip("10.0.0.2")).expect("held").id, a.id);
        // A record of A read before it exited does not bring it back: the incarnation is the same.
        let _ = w.apply(Change::Upsert(a.clone()));
        assert!(index.lookup(ip("10.0.0.2")).is_none());
        let _ = w.apply(Change::Replace(vec![a.clone()]));
        assert!(index.lookup(ip("10.0.0.2")).is_none(), "nor does a listing");
        // B, started on A's address, is B's at once.
        let _ = w.apply(Change::Upsert(container("b", "t2", &["10.0.0.2"])));
        assert_eq!(index.lookup(ip("10.0.0.2")).expect("B's").name, "name-b");
        // A new incarnation of A (restarted) is watched anew.
        let _ = w.apply(Change::Remove { id: a.id.clone() });
        let a2 = container("a", "t3", &["10.0.0.3"]);
        let _ = w.apply(Change::Upsert(a2.clone()));
        assert!(w.liveness_to_watch(&a2).is_some());
        assert_eq!(
            index.lookup(ip("10.0.0.3")).expect("A's again").name,
            "name-a"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_the_index_cannot_place_asks_the_watcher_once() {
        let (index, mut w) = index();
        synced_on_10_0(&mut w);
        let waiter = tokio::spawn({
            let index = index.clone();
            async move {
                index
                    .lookup_or_wait(ip("10.0.0.9"), Duration::from_millis(250))
                    .await
            }
        });
        tokio::time::timeout(Duration::from_millis(10), w.asked())
            .await
            .expect("asked at once, not after the wait");
        assert_eq!(w.take_asks(), vec![ip("10.0.0.9")]);
        assert_eq!(index.unplaced_callers(), 1);
        // The watcher's answer ends the wait.
        let _ = w.apply(Change::Upsert(container("late", "t1", &["10.0.0.9"])));
        let found = waiter.await.expect("join");
        assert!(matches!(found, Lookup::Container(c) if c.name == "name-late"));
        assert!(w.take_asks().is_empty(), "asked once");
        // Repeated asks for one address are one.
        index.ask(ip("10.0.0.7"));
        index.ask(ip("10.0.0.7"));
        assert_eq!(w.take_asks(), vec![ip("10.0.0.7")]);
    }

    #[test]
    fn a_restart_is_a_new_incarnation() {
        let a1 = container("a", "t1", &["10.0.0.2"]);
        let a2 = container("a", "t2", &["10.0.0.2"]);
        assert_ne!(a1.binding(), a2.binding());
        let (index, mut w) = index();
        let _ = w.apply(Change::Upsert(a1));
        let _ = w.apply(Change::Upsert(a2.clone()));
        assert_eq!(*index.lookup(ip("10.0.0.2")).expect("known"), a2);
    }

    #[test]
    fn replace_swaps_everything_and_drops_the_missing() {
        let (index, mut w) = index();
        let _ = w.apply(Change::Upsert(container("a", "t1", &["10.0.0.2"])));
        let _ = w.apply(Change::Replace(vec![container("b", "t1", &["10.0.0.3"])]));
        assert!(index.lookup(ip("10.0.0.2")).is_none());
        assert!(index.lookup(ip("10.0.0.3")).is_some());
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn gateways_are_not_containers() {
        let (index, mut w) = index();
        w.set_networks(vec![subnet("net", "172.18.0.0/16", "172.18.0.1", true)]);
        assert!(index.is_container_address(ip("172.18.0.7")));
        assert!(!index.is_container_address(ip("172.18.0.1")));
        assert!(!index.is_container_address(ip("127.0.0.1")));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_when_the_container_appears() {
        let (index, mut w) = index();
        synced_on_10_0(&mut w);
        let waiter = tokio::spawn({
            let index = index.clone();
            async move {
                index
                    .lookup_or_wait(ip("10.0.0.9"), Duration::from_millis(250))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = w.apply(Change::Upsert(container("late", "t1", &["10.0.0.9"])));
        let found = waiter.await.expect("join");
        assert!(matches!(found, Lookup::Container(c) if c.name == "name-late"));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let (index, mut w) = index();
        synced_on_10_0(&mut w);
        let started = tokio::time::Instant::now();
        let waiter = tokio::spawn({
            let index = index.clone();
            async move {
                index
                    .lookup_or_wait(ip("10.0.0.9"), Duration::from_millis(250))
                    .await
            }
        });
        // Unrelated changes wake the waiter but do not end the wait early.
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = w.apply(Change::Upsert(container(
                &format!("o{i}"),
                "t",
                &[&format!("10.0.1.{i}")],
            )));
        }
        assert!(matches!(
            waiter.await.expect("join"),
            Lookup::UnknownContainer
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn the_host_and_strangers_do_not_wait_once_synced() {
        let (index, mut w) = index();
        w.set_networks(vec![subnet("net", "10.0.0.0/16", "10.0.0.1", true)]);
        let started = tokio::time::Instant::now();
        let before_sync = tokio::spawn({
            let index = index.clone();
            async move {
                index
                    .lookup_or_wait(ip("192.0.2.1"), Duration::from_millis(250))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let _ = w.apply(Change::Replace(Vec::new()));
        w.set_ready();
        // The wait ended with the first sync, not at the deadline.
        assert!(matches!(
            before_sync.await.expect("join"),
            Lookup::NotAContainer
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(10));
        for host in ["10.0.0.1", "192.0.2.1"] {
            let l = index
                .lookup_or_wait(ip(host), Duration::from_millis(250))
                .await;
            assert!(matches!(l, Lookup::NotAContainer), "{host}: {l:?}");
        }
        assert_eq!(started.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_on_a_network_that_is_not_served_is_told_at_once() {
        let (index, mut w) = index();
        w.set_networks(vec![
            subnet("metadata", "169.254.169.0/24", "169.254.169.254", true),
            subnet("bridge", "172.17.0.0/16", "172.17.0.1", false),
        ]);
        let _ = w.apply(Change::Replace(vec![container(
            "a",
            "t1",
            &["169.254.169.2"],
        )]));
        w.set_ready();
        let started = tokio::time::Instant::now();
        let l = index
            .lookup_or_wait(ip("172.17.0.5"), Duration::from_millis(250))
            .await;
        assert!(
            matches!(&l, Lookup::Unserved(n) if &**n == "bridge"),
            "{l:?}"
        );
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait for an unserved network"
        );
        // The unserved network's gateway is the host, as any gateway is.
        let l = index
            .lookup_or_wait(ip("172.17.0.1"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::NotAContainer), "{l:?}");
        // A served network still waits for a container it does not know yet.
        let l = index
            .lookup_or_wait(ip("169.254.169.9"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::UnknownContainer), "{l:?}");
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnected_index_serves_nobody_until_it_resyncs() {
        let (index, mut w) = index();
        let _ = w.apply(Change::Replace(vec![container("a", "t1", &["10.0.0.2"])]));
        w.set_ready();
        assert!(matches!(
            index.lookup_or_wait(ip("10.0.0.2"), Duration::ZERO).await,
            Lookup::Container(_)
        ));
        w.set_unready();
        let l = index
            .lookup_or_wait(ip("10.0.0.2"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::NotSynced), "{l:?}");
        let _ = w.apply(Change::Replace(vec![container("a", "t1", &["10.0.0.2"])]));
        w.set_ready();
        assert!(matches!(
            index.lookup_or_wait(ip("10.0.0.2"), Duration::ZERO).await,
            Lookup::Container(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_index_that_never_syncs_says_so() {
        let (index, _w) = index();
        let l = index
            .lookup_or_wait(ip("10.0.0.9"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::NotSynced));
    }

    #[tokio::test]
    async fn subscribers_hear_about_changes() {
        let (index, mut w) = index();
        let mut rx = index.subscribe();
        let _ = w.apply(Change::Upsert(container("a", "t1", &["10.0.0.2"])));
        let _ = w.apply(Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        assert!(matches!(rx.recv().await, Ok(IndexEvent::Added(c)) if c.name == "name-a"));
        assert!(matches!(rx.recv().await, Ok(IndexEvent::Removed(c)) if c.name == "name-a"));
    }
}
