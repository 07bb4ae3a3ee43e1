//! The log destination failing (issue 15, item 6): the daemon binary with its stderr in a pipe
//! whose reader goes away (`imdsd … 2>&1 | head -4`, a broken journald stream) or stops reading
//! (a full pipe). Either way it keeps answering, and SIGTERM and SIGINT still stop it cleanly.

mod common;

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_command, extract_addr, raw};
use rustix::process::{Pid, Signal, kill_process};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/app";

/// The daemon, killed if a test fails before it exits.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    _state: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Sends `signal` and waits (up to 10 s) for the exit code.
    fn stop(&mut self, signal: Signal) -> Option<i32> {
        kill_process(Pid::from_child(&self.child), signal).expect("signal");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn dropped_lines(&self) -> f64 {
        let metrics = raw(self.admin, "GET", "/metrics", &[]).text();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("imdsd_log_lines_dropped_total "))
            .unwrap_or_else(|| panic!("no imdsd_log_lines_dropped_total in\n{metrics}"))
            .trim()
            .parse()
            .expect("a number")
    }
}

/// Starts the daemon with its stderr (JSON lines) into a pipe, reads the pipe until the daemon
/// says where it serves, and returns the daemon and the pipe's reading end (to close, or to keep
/// open and never read again).
fn start(extra: &[&str]) -> (Daemon, BufReader<File>) {
    let state = tempfile::tempdir().expect("tempdir");
    // Close-on-exec: the daemon must hold only the writing end, as its stderr.
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
    let mut args = vec![
        "--log-format",
        "json",
        "--fake-credentials",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state.path().to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    args.push("app");
    let mut cmd = daemon_command(&[], &args, &[]);
    cmd.stdout(Stdio::null()).stderr(Stdio::from(write));
    let child = cmd.spawn().expect("spawn imdsd");
    // The command holds the pipe's writing end: only the daemon may keep it open.
    drop(cmd);

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(File::from(read));
        let (mut addr, mut admin) = (None, None);
        let mut lines = Vec::new();
        while addr.is_none() && lines.len() < 50 {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line.contains("serving admin API") {
                admin = extract_addr(&line);
            }
            if line.contains("serving instance metadata") {
                addr = extract_addr(&line);
            }
            lines.push(line);
        }
        let _ = tx.send((addr, admin, lines, reader));
    });
    let (addr, admin, lines, reader) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the daemon starts within 30 s");
    let daemon = Daemon {
        child,
        addr: addr.unwrap_or_else(|| panic!("no metadata address in {lines:?}")),
        admin: admin.unwrap_or_else(|| panic!("no admin address in {lines:?}")),
        _state: state,
    };
    (daemon, reader)
}

fn assert_serves(d: &Daemon, requests: usize) {
    for i in 0..requests {
        let r = raw(d.addr, "GET", CREDS, &[]);
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert!(r.text().contains("\"Code\" : \"Success\""), "{r:?}");
    }
}

/// `imdsd … 2>&1 | head -4`: the reader goes away after the first lines.
fn closed_pipe_then(signal: Signal) {
    let (mut d, reader) = start(&[]);
    drop(reader);
    // Every one of these writes an access line into the closed pipe.
    assert_serves(&d, 30);
    assert!(d.dropped_lines() >= 1.0, "the lost lines are counted");
    assert_serves(&d, 5);
    assert_eq!(d.stop(signal), Some(0), "exits 0 on {signal:?}");
}

#[test]
fn a_closed_log_pipe_stops_neither_serving_nor_shutdown_on_sigterm() {
    closed_pipe_then(Signal::TERM);
}

#[test]
fn a_closed_log_pipe_stops_neither_serving_nor_shutdown_on_sigint() {
    closed_pipe_then(Signal::INT);
}

#[test]
fn a_log_pipe_nobody_reads_blocks_neither_requests_nor_shutdown() {
    // Every request writes a line (no repeat filter): 2,000 lines of ~300 bytes are several times
    // what the pipe (64 KiB) and the daemon's buffer hold.
    let (mut d, reader) = start(&["--access-log-burst", "0"]);
    assert_serves(&d, 2_000);
    assert!(
        d.dropped_lines() >= 100.0,
        "the lines that did not fit are dropped and counted"
    );
    assert_eq!(d.stop(Signal::TERM), Some(0));
    // The reader was open (and full) all along.
    drop(reader);
}
