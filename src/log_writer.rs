//! Where log lines go: a writer that never panics and never blocks the thread that logs.
//!
//! A daemon's stderr is a pipe or a socket it does not control: `imdsd … | head -4` closes it after
//! four lines, journald's stream can break, and a reader that stops reading fills it. Written to
//! directly, the first fails every write with EPIPE (and `tracing-subscriber` then reports the
//! failure with `eprintln!`, which panics: in the request handler, and in the signal handler, so
//! the daemon answered nobody and ignored SIGTERM), and the last blocks every runtime worker in
//! `write(2)`.
//!
//! [`LogWriter`] appends each line to a bounded buffer instead, and one thread of its own writes
//! the buffer out. A line that does not fit (the destination is slow or stopped) is dropped and
//! counted; so is a line the destination refuses (closed pipe, broken socket). The writer never
//! reports through stderr itself; when lines could be written again, it logs how many were lost.
//! The count is exported as `imdsd_log_lines_dropped_total`.
//!
//! It owns no formatting ([`crate::logging`] does) and writes to the file descriptor directly,
//! without `std`'s stderr lock, so that a writer stuck on a full pipe holds nothing anyone else
//! waits for.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes of log lines held while the destination is busy: a few thousand lines, enough for a
/// burst while journald catches up, little enough to cost nothing when the destination is gone.
pub const BUFFER_BYTES: usize = 256 * 1024;

/// How long a destination that answers "try again" (a non-blocking descriptor) is left alone.
const RETRY_AFTER: Duration = Duration::from_millis(10);

/// Lines dropped by every [`LogWriter`] of the process (the daemon has one).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The writer installed by [`install_stderr`], for [`flush`].
static STDERR: OnceLock<LogWriter> = OnceLock::new();

/// Log lines lost since the process started: dropped because the destination was full, slow, or
/// failing.
pub fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The process's stderr writer, started on first use.
pub fn install_stderr() -> LogWriter {
    STDERR
        .get_or_init(|| LogWriter::start(std::io::stderr(), BUFFER_BYTES))
        .clone()
}

/// Waits up to `timeout` for the stderr writer (if installed) to write out what it holds: before
/// the process exits, so that the last lines ("stopped") are not lost. Bounded, because a
/// destination that stopped reading never drains.
pub fn flush(timeout: Duration) {
    if let Some(writer) = STDERR.get() {
        writer.flush(timeout);
    }
}

/// A handle for appending lines; clones share one buffer and one writing thread.
#[derive(Clone, Debug)]
pub struct LogWriter(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// The writing thread waits here for lines.
    lines_ready: Condvar,
    /// [`LogWriter::flush`] waits here for the buffer to empty.
    written: Condvar,
    capacity: usize,
}

#[derive(Debug)]
struct Pending {
    /// Whole lines, not yet handed to the writing thread.
    bytes: Vec<u8>,
    /// Whether the writing thread is asleep waiting for lines (it is woken only then).
    waiting: bool,
    /// Whether the writing thread holds a batch it has not finished writing.
    writing: bool,
    /// No writing thread could be started: every line is dropped.
    no_writer: bool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogWriter {
    /// Starts a thread that writes to `destination`, buffering up to `capacity` bytes of lines.
    /// If the thread cannot be started, lines are dropped (and counted): logging must not stop
    /// the daemon.
    pub fn start<D: AsFd + Send + 'static>(destination: D, capacity: usize) -> LogWriter {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(capacity),
                waiting: false,
                writing: false,
                no_writer: false,
            }),
            lines_ready: Condvar::new(),
            written: Condvar::new(),
            capacity,
        });
        let thread = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("imdsd-log".into())
            .spawn(move || write_out(&thread, destination));
        if spawned.is_err() {
            shared.pending().no_writer = true;
        }
        LogWriter(shared)
    }

    /// Appends one line (or several), whole, or drops it when the buffer is full. Never blocks
    /// on the destination; the lock is held for a copy.
    pub fn append(&self, line: &[u8]) {
        let shared = &*self.0;
        let mut pending = shared.pending();
        if pending.bytes.len() + line.len() > shared.capacity || pending.no_writer {
            drop(pending);
            DROPPED.fetch_add(line_count(line), Ordering::Relaxed);
            return;
        }
        pending.bytes.extend_from_slice(line);
        let wake = std::mem::take(&mut pending.waiting);
        drop(pending);
        if wake {
            shared.lines_ready.notify_one();
        }
    }

    /// Waits up to `timeout` until everything appended so far has been written (or dropped).
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut pending = self.0.pending();
        while (!pending.bytes.is_empty() || pending.writing) && !pending.no_writer {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            pending = match self.0.written.wait_timeout(pending, left) {
                Ok((p, _)) => p,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// The number of lines in `bytes` (a partial last line counts as one).
fn line_count(bytes: &[u8]) -> u64 {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
    let partial = usize::from(bytes.last().is_some_and(|&b| b != b'\n'));
    u64::try_from(newlines + partial).unwrap_or(u64::MAX)
}

/// The writing thread: takes the buffered lines in batches and writes each out; on failure,
/// counts the batch's unwritten lines as dropped and goes on (a destination may recover: a
/// reader may read again). The thread ends with the process.
fn write_out<D: AsFd>(shared: &Shared, destination: D) {
    let mut batch = Vec::with_capacity(shared.capacity);
    let mut reported = DROPPED.load(Ordering::Relaxed);
    loop {
        {
            let mut pending = shared.pending();
            pending.writing = false;
            if pending.bytes.is_empty() {
                shared.written.notify_all();
            }
            while pending.bytes.is_empty() {
                pending.waiting = true;
                pending = match shared.lines_ready.wait(pending) {
                    Ok(p) => p,
                    Err(e) => e.into_inner(),
                };
            }
            pending.waiting = false;
            pending.writing = true;
            std::mem::swap(&mut pending.bytes, &mut batch);
        }
        match write_all(&destination, &batch) {
            Ok(()) => {
                let dropped = DROPPED.load(Ordering::Relaxed);
                if dropped > reported {
                    // Through the log itself, in its format, now that the destination takes
                    // lines again.
                    tracing::warn!(
                        lines = dropped - reported,
                        "log lines were dropped: the log destination was full or failing"
                    );
                    reported = dropped;
                }
            }
            Err(written) => {
                DROPPED.fetch_add(line_count(&batch[written..]), Ordering::Relaxed);
            }
        }
        batch.clear();
    }
}

/// Writes all of `bytes`, or returns how many were written before the destination failed.
fn write_all<D: AsFd>(destination: &D, bytes: &[u8]) -> Result<(), usize> {
    let mut written = 0;
    while written < bytes.len() {
        match rustix::io::write(destination, &bytes[written..]) {
            Ok(0) => return Err(written),
            Ok(n) => written += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) if io::Error::from(e).kind() == io::ErrorKind::WouldBlock => {
                // A descriptor someone made non-blocking: wait a little; lines keep being
                // buffered meanwhile, and dropped once the buffer is full.
                std::thread::sleep(RETRY_AFTER);
            }
            Err(_) => return Err(written),
        }
    }
    Ok(())
}

impl io::Write for &LogWriter {
    /// Takes the whole line (`tracing-subscriber` writes each event with one `write_all`), so the
    /// caller never sees an error and never retries.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::os::fd::OwnedFd;

    use super::*;

    fn pipe() -> (std::fs::File, OwnedFd) {
        let (read, write) = rustix::pipe::pipe().expect("pipe");
        (std::fs::File::from(read), write)
    }

    #[test]
    fn lines_reach_the_destination_whole_and_in_order() {
        let (mut read, write) = pipe();
        let writer = LogWriter::start(write, 4096);
        for i in 0..100 {
            writer.append(format!("line {i}\n").as_bytes());
        }
        writer.flush(Duration::from_secs(10));
        drop(writer);
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while text.lines().count() < 100 {
            let n = read.read(&mut buf).expect("read");
            assert!(n > 0, "the writer closed early: {text}");
            text.push_str(std::str::from_utf8(&buf[..n]).expect("utf-8"));
        }
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn a_closed_destination_drops_and_counts_lines_without_failing() {
        let (read, write) = pipe();
        drop(read);
        let writer = LogWriter::start(write, 4096);
        let before = lines_dropped();
        for _ in 0..50 {
            writer.append(b"nobody reads this\n");
            writer.flush(Duration::from_secs(10));
        }
        assert!(
            lines_dropped() - before >= 50,
            "{} dropped",
            lines_dropped() - before
        );
    }

    #[test]
    fn a_full_destination_never_blocks_the_thread_that_logs() {
        // Nobody reads: the pipe fills (64 KiB), then the buffer (4 KiB), then lines are dropped.
        let (_read, write) = pipe();
        let writer = LogWriter::start(write, 4096);
        let before = lines_dropped();
        let (done, finished) = std::sync::mpsc::channel();
        let logging = writer.clone();
        std::thread::spawn(move || {
            let mut line = [b'x'; 100];
            line[99] = b'\n';
            for _ in 0..5_000 {
                logging.append(&line);
            }
            logging.flush(Duration::from_millis(50));
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("5,000 appends and a bounded flush return although nothing is written");
        assert!(lines_dropped() - before > 4_000, "the rest were dropped");
    }

    #[test]
    fn line_counts_include_a_partial_last_line() {
        assert_eq!(line_count(b""), 0);
        assert_eq!(line_count(b"a\n"), 1);
        assert_eq!(line_count(b"a\nb"), 2);
        assert_eq!(line_count(b"a\nb\n"), 2);
    }
}
