//! Knows the moment a container's init process exits, from the kernel (a pidfd), not from the
//! engine's event stream, which may come late: Podman's by a quarter of a second (it polls its
//! event file), Docker's behind a backlog of re-inspections. A container removed while running
//! can be followed on its address by a new container that asks before the old one's `die` has
//! been applied; the index must not answer it with the old container's role. The engine frees an
//! address only after the container's init process has exited, so a mark set when the kernel
//! reports that exit always comes before any other container can call from the address.
//!
//! What it owns: opening a container's init process ([`Pidfd::open`]) and a task that waits for
//! the exits ([`Monitor`]); on an exit it marks the incarnation's [`Liveness`] in the index and
//! asks the watcher to look up the container's addresses again. What it does not: deciding who
//! holds an address (the watcher and the index do).
//!
//! It works where imdsd sees the host's processes: on the host (the host layout, the systemd
//! unit), or in a container sharing the host's PID namespace. Elsewhere (imdsd in a container of
//! its own) a container's process cannot be opened, and the index follows the engine's events
//! alone, as before. A process is taken for a container's init only if its cgroup names the
//! container, so a reused pid, or a pid from another namespace, is never watched by mistake.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use rustix::event::epoll;

use crate::index::{Index, Liveness};

/// A container's init process, held open.
#[derive(Debug)]
pub struct Pidfd(OwnedFd);

impl Pidfd {
    /// Opens process `pid` if it is container `id`'s (its cgroup names the container); `None`
    /// when that cannot be established: the process is gone, or this is not imdsd's PID
    /// namespace.
    pub fn open(pid: i64, id: &str) -> Option<Pidfd> {
        if id.len() < 12 {
            return None;
        }
        let raw = i32::try_from(pid).ok().filter(|p| *p > 0)?;
        let fd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(raw)?,
            rustix::process::PidfdFlags::empty(),
        )
        .ok()?;
        // Read after opening: the pidfd holds whatever process had the pid then, and the
        // cgroup says whether that was the container's.
        let cgroup = std::fs::read_to_string(format!("/proc/{raw}/cgroup")).ok()?;
        cgroup.contains(id).then_some(Pidfd(fd))
    }
}

/// One incarnation to watch.
struct Watch {
    pidfd: Pidfd,
    liveness: Arc<Liveness>,
    addresses: Vec<IpAddr>,
}

/// Waits for the watched init processes to exit, on a thread of its own: an exit is marked
/// within microseconds, however busy the runtime that serves requests is. Cheap to clone; the
/// thread ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Monitor {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    watches: Option<mpsc::Sender<Watch>>,
    /// Wakes the thread for new watches, and for the end.
    wake: OwnedFd,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Disconnected first, so that the woken thread sees the end.
        self.watches = None;
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// The key of the wake-up eventfd in the epoll set; pidfds get 1, 2, ….
const WAKE: u64 = 0;

impl Monitor {
    /// Starts the thread, which marks exits in `index` and counts them in `exits`. Without
    /// epoll or eventfd (which Linux has had for long), nothing is watched, and the index
    /// follows the engine's events alone.
    pub fn spawn(index: Index, exits: Arc<AtomicU64>) -> Monitor {
        let start = || -> std::io::Result<Monitor> {
            let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
            let wake = rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )?;
            epoll::add(
                &epoll,
                &wake,
                epoll::EventData::new_u64(WAKE),
                epoll::EventFlags::IN,
            )?;
            let thread_wake = wake.try_clone()?;
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("imdsd-liveness".into())
                .spawn(move || run(&epoll, &thread_wake, &rx, &index, &exits))?;
            Ok(Monitor {
                inner: Some(Arc::new(Inner {
                    watches: Some(tx),
                    wake,
                })),
            })
        };
        start().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot watch containers' processes: a container's exit is known from the engine's events only");
            Monitor { inner: None }
        })
    }

    /// Watches `pidfd`'s process for the incarnation whose `liveness` it is, holding
    /// `addresses`.
    pub fn watch(&self, pidfd: Pidfd, liveness: Arc<Liveness>, addresses: Vec<IpAddr>) {
        let Some(inner) = &self.inner else { return };
        if let Some(tx) = &inner.watches
            && tx
                .send(Watch {
                    pidfd,
                    liveness,
                    addresses,
                })
                .is_ok()
        {
            let _ = rustix::io::write(&inner.wake, &1u64.to_ne_bytes());
        }
    }
}

fn run(
    epoll: &OwnedFd,
    wake: &OwnedFd,
    watches: &mpsc::Receiver<Watch>,
    index: &Index,
    exits: &AtomicU64,
) {
    let mut watching: HashMap<u64, Watch> = HashMap::new();
    let mut next_key = WAKE + 1;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
    loop {
        events.clear();
        match epoll::wait(epoll, rustix::buffer::spare_capacity(&mut events), None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "stopped watching containers' processes: a container's exit is known from the engine's events only");
                return;
            }
        }
        for event in &events {
            let key = event.data.u64();
            if key == WAKE {
                let _ = rustix::io::read(wake, &mut [0u8; 8]);
                loop {
                    match watches.try_recv() {
                        Ok(w) => {
                            let added = epoll::add(
                                epoll,
                                &w.pidfd.0,
                                epoll::EventData::new_u64(next_key),
                                epoll::EventFlags::IN,
                            );
                            match added {
                                Ok(()) => {
                                    watching.insert(next_key, w);
                                    next_key += 1;
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "cannot wait for a container's init process")
                                }
                            }
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    }
                }
            } else if let Some(w) = watching.remove(&key) {
                let _ = epoll::delete(epoll, &w.pidfd.0);
                w.liveness.set_exited();
                exits.fetch_add(1, Ordering::Relaxed);
                index.wake();
                for ip in w.addresses {
                    index.ask(ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Change, Container};
    use std::time::Duration;

    #[test]
    fn a_process_is_not_taken_for_a_container_its_cgroup_does_not_name() {
        // This test process is nobody's container.
        let me = i64::from(std::process::id());
        assert!(Pidfd::open(me, &"f".repeat(64)).is_none());
        assert!(Pidfd::open(-1, &"f".repeat(64)).is_none());
        // Its own cgroup's last component names it, as a container's names the container.
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let own = cgroup
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .find(|c| c.len() >= 12);
        if let Some(own) = own {
            assert!(Pidfd::open(me, own).is_some());
        }
    }

    #[tokio::test]
    async fn an_exit_marks_the_incarnation_and_asks_the_watcher_at_once() {
        let (index, mut writer) = crate::index::index();
        let child = tokio::process::Command::new("sleep")
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sleep");
        let pid = child.id().expect("running");
        let fd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid"),
            rustix::process::PidfdFlags::empty(),
        )
        .expect("pidfd");
        let ip: IpAddr = "10.0.0.2".parse().expect("ip");
        let c = Container {
            id: "a".repeat(64),
            name: "a".into(),
            started_at: "t1".into(),
            image: "img".into(),
            addresses: vec![ip],
            networks: vec!["net".into()],
            labels: Default::default(),
            env: Default::default(),
        };
        let _ = writer.apply(Change::Upsert(c.clone()));
        writer.set_ready();
        let exits = Arc::new(AtomicU64::new(0));
        let monitor = Monitor::spawn(index.clone(), exits.clone());
        let liveness = writer.liveness_to_watch(&c).expect("not watched yet");
        assert!(writer.liveness_to_watch(&c).is_none(), "watched once");
        monitor.watch(Pidfd(fd), liveness, c.addresses.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            writer.take_asks().is_empty(),
            "nothing to look at while it runs"
        );
        assert!(index.lookup(ip).is_some(), "running: the container's");
        let generation = index.generation();
        drop(child);
        let asked = tokio::time::timeout(Duration::from_secs(10), writer.asked()).await;
        assert!(asked.is_ok(), "the exit asks the watcher to look");
        assert_eq!(writer.take_asks(), vec![ip]);
        assert!(index.lookup(ip).is_none(), "exited: nobody's");
        assert!(index.generation() > generation, "connections look again");
        assert_eq!(index.owner_in_doubt(ip).expect("held").id, c.id);
        assert_eq!(exits.load(Ordering::Relaxed), 1);
    }
}
