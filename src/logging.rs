//! Log output: one line per event on stderr, as text or JSON, through `tracing-subscriber`.
//!
//! Every metadata request writes an access line (target [`ACCESS_TARGET`]), so that line's
//! formatting is on the request path. `tracing-subscriber`'s formatters are general (ANSI styles,
//! spans, `format_args!` per field, serde for JSON) and cost a large share of a cached request's
//! CPU (see BENCHMARKS.md), so [`Lines`] writes access lines itself, in the very bytes the general
//! formatter would write, and hands every other event (and access lines in a span, or on a colour
//! terminal) to it. [`UtcMicros`] is the timestamp of both: RFC 3339 in UTC with microseconds, as
//! `tracing-subscriber`'s own, with the date and time of day formatted once per second.
//!
//! It also owns which access lines are written at all: [`RepeatFilter`] keeps one caller's
//! identical lines to a few a second (`--access-log-burst`).

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::hash::BuildHasher as _;
use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::clock::format_iso8601;
use crate::config::LogFormat;

/// The target of the per-request access line.
pub const ACCESS_TARGET: &str = "imdsd::access";

/// Default for `--access-log-burst`: identical access lines written per caller and second.
pub const DEFAULT_ACCESS_LOG_BURST: u32 = 10;

/// Keeps one caller's *identical* access lines (same method, path, status and user agent) to
/// `burst` a second, so that a client calling in a loop cannot flood the log: journald's rate
/// limit (10,000 lines in 30 s by default) would otherwise drop lines from every other caller,
/// warnings included, and at tens of thousands of requests a second the lines would cost more than
/// the answers. Requests left out are still answered and counted in the metrics; the caller's next
/// written line says how many (`suppressed=N`). The caller's last [`REMEMBERED_LINES`] different
/// lines are each limited on their own, so that a loop of a few different requests (an SDK client
/// made anew for every call: token PUT, role listing, credentials GET) is kept down as well; a
/// line that is none of them is always written. Many callers in a loop at once share one more
/// limit, [`RepeatLimits`].
#[derive(Debug, Default)]
pub struct RepeatFilter(Mutex<Runs>);

/// How many of a caller's different lines [`RepeatFilter`] tells apart.
pub const REMEMBERED_LINES: usize = 4;

#[derive(Debug, Default)]
struct Runs {
    lines: [Run; REMEMBERED_LINES],
    /// Requests not written since the caller's last written line.
    suppressed: u64,
}

/// One remembered line. Kept inline, so that the check on every request reads no other memory.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    /// The line's four parts, hashed with the process's seed ([`RepeatLimits`]); `None` for a
    /// slot not used yet. Two different lines with the same 64-bit hash would share a limit:
    /// the second would at worst be counted instead of written for a second.
    line: Option<u64>,
    /// When the current one-second window for the line ends.
    window_end: Option<Instant>,
    /// Lines written in the window.
    written: u32,
}

/// What to do with one access line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it, saying how many identical requests before it were not written.
    Write { suppressed: u64 },
    /// Leave it out (it is counted).
    Skip,
}

/// How many identical access lines are written: `burst` a second per caller ([`RepeatFilter`]),
/// and `10 × burst` a second from all callers together. A per-caller limit alone lets a hundred
/// containers in a loop write a thousand lines a second, which trips journald's limit just the
/// same; lines that differ from their caller's last one are not counted against either limit.
#[derive(Debug)]
pub struct RepeatLimits {
    burst: u32,
    /// Hashes the callers' lines; seeded per process.
    lines: foldhash::quality::RandomState,
    total: u32,
    /// Seconds are counted from here…
    since: Instant,
    /// …and this is the second `used` counts in.
    second: AtomicU64,
    used: AtomicU32,
}

impl RepeatLimits {
    /// `burst` identical lines a second per caller; 0 writes every line.
    pub fn new(burst: u32) -> Self {
        Self {
            burst,
            lines: foldhash::quality::RandomState::default(),
            total: burst.saturating_mul(10),
            since: Instant::now(),
            second: AtomicU64::new(0),
            used: AtomicU32::new(0),
        }
    }

    /// Takes one of this second's repeated lines for all callers, if one is left. Lock-free: only
    /// repeats a caller's own burst lets through come here, a few per caller and second.
    fn take(&self, now: Instant) -> bool {
        let second = now.saturating_duration_since(self.since).as_secs();
        let current = self.second.load(Ordering::Relaxed);
        // Requests stamped just before a new second began may arrive after it: they count in it.
        if second > current
            && self
                .second
                .compare_exchange(current, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        self.used.fetch_add(1, Ordering::Relaxed) < self.total
    }
}

impl Default for RepeatLimits {
    fn default() -> Self {
        Self::new(DEFAULT_ACCESS_LOG_BURST)
    }
}

impl RepeatFilter {
    /// Whether to write the line for (`method`, `path`, `status`, `agent`) at `now`, within
    /// `limits`.
    pub fn check(
        &self,
        limits: &RepeatLimits,
        [method, path, status, agent]: [&str; 4],
        now: Instant,
    ) -> Verdict {
        if limits.burst == 0 {
            return Verdict::Write { suppressed: 0 };
        }
        // `str`'s hash ends each part with a byte UTF-8 never has: moving text from one part to
        // the next makes another line.
        let line = limits.lines.hash_one((method, path, status, agent));
        let mut runs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let write = match runs.lines.iter().position(|r| r.line == Some(line)) {
            Some(i) => {
                let run = &mut runs.lines[i];
                if run.window_end.is_none_or(|end| now >= end) {
                    run.window_end = now.checked_add(Duration::from_secs(1));
                    run.written = 0;
                }
                let write = run.written < limits.burst && limits.take(now);
                run.written += u32::from(write);
                write
            }
            None => {
                // A line none of the remembered ones: written, and remembered in place of the
                // one whose window began longest ago (an unused slot first).
                let oldest = runs
                    .lines
                    .iter_mut()
                    .min_by_key(|r| r.window_end)
                    .unwrap_or_else(|| unreachable!("REMEMBERED_LINES > 0"));
                *oldest = Run {
                    line: Some(line),
                    window_end: now.checked_add(Duration::from_secs(1)),
                    written: 1,
                };
                true
            }
        };
        if write {
            Verdict::Write {
                suppressed: std::mem::take(&mut runs.suppressed),
            }
        } else {
            runs.suppressed += 1;
            Verdict::Skip
        }
    }
}

/// What identifies an access line for [`RepeatFilter`].
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub status: http::StatusCode,
    pub agent: &'a str,
}

impl AccessLine<'_> {
    /// `None` when the line is to be left out; else the `suppressed` field it carries (absent
    /// when nothing was left out). Lines without a workload (refused before the caller was looked
    /// up) are always written.
    pub fn admit(
        &self,
        filter: Option<&RepeatFilter>,
        limits: &RepeatLimits,
        now: Instant,
    ) -> Option<Option<u64>> {
        let Some(filter) = filter else {
            return Some(None);
        };
        let parts = [
            self.method.as_str(),
            self.path,
            self.status.as_str(),
            self.agent,
        ];
        match filter.check(limits, parts, now) {
            Verdict::Skip => None,
            Verdict::Write { suppressed } => Some((suppressed > 0).then_some(suppressed)),
        }
    }
}

/// At most `per_second` lines a second of one kind, whatever they say; the rest are counted and
/// the next line written says how many. For warnings an outsider can cause at will, each one
/// different (the admin API's refused requests): a [`RepeatFilter`] lets every new line through.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    /// When the current one-second window ends.
    window_end: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl Throttle {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::default(),
        }
    }

    /// `None` when the line is to be left out; else the `suppressed` field it carries (absent
    /// when nothing was left out), as [`AccessLine::admit`].
    pub fn admit(&self, now: Instant) -> Option<Option<u64>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.window_end.is_none_or(|end| now >= end) {
            state.window_end = now.checked_add(Duration::from_secs(1));
            state.written = 0;
        }
        if state.written < self.per_second {
            state.written += 1;
            let suppressed = std::mem::take(&mut state.suppressed);
            Some((suppressed > 0).then_some(suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

/// Installs the process's logger: `filter` (an `EnvFilter` directive string, checked by the
/// configuration) on stderr, in `format`.
///
/// Lines go through [`crate::log_writer`], which drops (and counts) what stderr cannot take
/// instead of failing or blocking: a closed or full stderr must not stop the daemon from serving
/// or from shutting down. Panics are logged the same way rather than printed, for the same reason.
pub fn init(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::log_writer::install_stderr())
        // The writer never fails; were it to, the report would go to stderr with `eprintln!`,
        // which panics when stderr is closed.
        .log_internal_errors(false);
    let general = tracing_subscriber::fmt::format().with_timer(UtcMicros);
    match format {
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(Lines::json(
                general.json().flatten_event(true).with_current_span(false),
            ))
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Lines::text(general))
            .init(),
    }
    std::panic::set_hook(Box::new(log_panic));
}

/// Logs a panic (with a backtrace when `RUST_BACKTRACE` asks for one) instead of writing it to
/// stderr, where the default hook would block on a full pipe.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let thread = std::thread::current();
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = match backtrace.status() {
        std::backtrace::BacktraceStatus::Captured => Some(backtrace.to_string()),
        _ => None,
    };
    tracing::error!(
        thread = thread.name().unwrap_or("unnamed"),
        backtrace = backtrace.as_deref(),
        "{info}"
    );
}

/// Access lines written directly; everything else by `general`.
#[derive(Debug, Clone)]
pub struct Lines<F, T = UtcMicros> {
    general: F,
    timer: T,
    json: bool,
}

impl<F> Lines<F> {
    /// Text lines: `<time>  INFO imdsd::access: method=GET path="/…" …`.
    pub fn text(general: F) -> Self {
        Self::with_timer(general, UtcMicros, false)
    }

    /// JSON lines, flattened: `{"timestamp":…,"level":"INFO","method":"GET",…,"target":…}`.
    pub fn json(general: F) -> Self {
        Self::with_timer(general, UtcMicros, true)
    }
}

impl<F, T> Lines<F, T> {
    /// `timer` must be the one `general` uses, so that both kinds of line agree.
    pub fn with_timer(general: F, timer: T, json: bool) -> Self {
        Self {
            general,
            timer,
            json,
        }
    }
}

impl<S, N, F, T> FormatEvent<S, N> for Lines<F, T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // Colours (text on a terminal; JSON has none) and span context are for people reading
        // along, not the request path: the general formatter has them right.
        if meta.target() != ACCESS_TARGET
            || (!self.json && writer.has_ansi_escapes())
            || event.parent().is_some()
            || ctx.lookup_current().is_some()
        {
            return self.general.format_event(ctx, writer, event);
        }
        if self.json {
            writer.write_str("{\"timestamp\":\"")?;
            if self.timer.format_time(&mut writer).is_err() {
                writer.write_str("<unknown time>")?;
            }
            writer.write_str("\",\"level\":\"")?;
            writer.write_str(meta.level().as_str())?;
            writer.write_char('"')?;
            let mut fields = JsonFieldWriter {
                writer: &mut writer,
                result: Ok(()),
            };
            event.record(&mut fields);
            fields.result?;
            writer.write_str(",\"target\":")?;
            write_json_str(&mut writer, meta.target())?;
            writer.write_str("}\n")
        } else {
            if self.timer.format_time(&mut writer).is_err() {
                writer.write_str("<unknown time>")?;
            }
            // The level right-aligned in five columns, as the general formatter writes it.
            let level = meta.level().as_str();
            for _ in level.len()..6 {
                writer.write_char(' ')?;
            }
            writer.write_str(level)?;
            writer.write_char(' ')?;
            writer.write_str(meta.target())?;
            writer.write_str(": ")?;
            let mut fields = TextFieldWriter {
                writer: &mut writer,
                first: true,
                result: Ok(()),
            };
            event.record(&mut fields);
            fields.result?;
            writer.write_char('\n')
        }
    }
}

/// `name=value` pairs separated by spaces, as `tracing-subscriber`'s default field formatter
/// writes them: strings and `?` values in `Debug` form, `%` values in `Display` form.
struct TextFieldWriter<'w, 'a> {
    writer: &'w mut Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl TextFieldWriter<'_, '_> {
    fn start(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        if field.name() != "message" {
            self.writer.write_str(field.name())?;
            self.writer.write_char('=')?;
        }
        Ok(())
    }
}

impl Visit for TextFieldWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = self.start(field).and_then(|()| {
            if field.name() == "message" {
                self.writer.write_str(value)
            } else if value
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
            {
                // What `str`'s `Debug` writes for printable ASCII without quotes or backslashes.
                self.writer.write_char('"')?;
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() {
            self.result = self
                .start(field)
                .and_then(|()| write_u64(self.writer, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self
                .start(field)
                .and_then(|()| write!(self.writer, "{value:?}"));
        }
    }
}

/// `,"name":value` members, as `tracing-serde` writes them: strings and `Debug`/`Display` values
/// as JSON strings, numbers and booleans as such.
struct JsonFieldWriter<'w, 'a> {
    writer: &'w mut Writer<'a>,
    result: fmt::Result,
}

impl JsonFieldWriter<'_, '_> {
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            self.writer.write_char(',')?;
            write_json_str(self.writer, field.name())?;
            self.writer.write_char(':')?;
            value(self.writer)
        })();
    }
}

impl Visit for JsonFieldWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |w| write_json_str(w, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |w| write_u64(w, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(JsonEscaped(&mut *w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// A JSON string literal, escaped as `serde_json` escapes it.
fn write_json_str(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    JsonEscaped(&mut *w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what passes through for the inside of a JSON string: `"`, `\` and control characters
/// (`\n`, `\r`, `\t`, `\b`, `\f` in short form, the rest as `\u00XX`), in runs between them.
struct JsonEscaped<W>(W);

impl<W: fmt::Write> fmt::Write for JsonEscaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let short = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if short.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(short)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

/// Decimal digits without going through `core::fmt`'s machinery.
fn write_u64(w: &mut impl fmt::Write, mut value: u64) -> fmt::Result {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    w.write_str(std::str::from_utf8(&digits[at..]).map_err(|_| fmt::Error)?)
}

/// RFC 3339 in UTC with microseconds (`2026-11-23T12:53:08.123456Z`), as `tracing-subscriber`'s
/// `SystemTime` timer writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct UtcMicros;

/// Length of `YYYY-MM-DDTHH:MM:SS.`.
const SECOND_PREFIX: usize = 20;

thread_local! {
    /// The second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS.`.
    static LAST_SECOND: Cell<(u64, [u8; SECOND_PREFIX])> = const { Cell::new((u64::MAX, [0; SECOND_PREFIX])) };
}

impl UtcMicros {
    /// Writes `since_epoch` (`SystemTime::now()` in use; any instant in tests).
    fn write(w: &mut impl fmt::Write, since_epoch: Duration) -> fmt::Result {
        let secs = since_epoch.as_secs();
        let (cached, mut prefix) = LAST_SECOND.get();
        if cached != secs {
            let formatted = format_iso8601(UNIX_EPOCH + Duration::from_secs(secs));
            // `…THH:MM:SSZ`, 20 bytes for years 0000–9999; other years are written uncached.
            let Some(date_time) = formatted.strip_suffix('Z') else {
                return Err(fmt::Error);
            };
            if date_time.len() + 1 != SECOND_PREFIX {
                return write!(w, "{date_time}.{:06}Z", since_epoch.subsec_micros());
            }
            prefix[..SECOND_PREFIX - 1].copy_from_slice(date_time.as_bytes());
            prefix[SECOND_PREFIX - 1] = b'.';
            LAST_SECOND.set((secs, prefix));
        }
        let mut micros = since_epoch.subsec_micros();
        let mut tail = *b"000000Z";
        for digit in tail[..6].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        w.write_str(std::str::from_utf8(&prefix).map_err(|_| fmt::Error)?)?;
        w.write_str(std::str::from_utf8(&tail).map_err(|_| fmt::Error)?)
    }
}

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| fmt::Error)?;
        Self::write(w, now)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::{DefaultFields, Format};

    use super::*;

    /// A fixed time, so that the general formatter's lines and ours can be compared byte for byte.
    #[derive(Clone, Copy)]
    struct At(Duration);

    impl FormatTime for At {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            UtcMicros::write(w, self.0)
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn take(&self) -> String {
            let mut bytes = self.0.lock().expect("lock");
            String::from_utf8(std::mem::take(&mut *bytes)).expect("utf-8")
        }
    }

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    const AT: At = At(Duration::from_micros(1_795_437_188_004_050));

    /// Every kind of value the access line records, with the characters that need escaping.
    fn emit_access_lines() {
        for agent in [
            "aws-sdk-rust/1.3 os/linux",
            "quote\" backslash\\ tab\t newline\n bell\u{7} nul\0 é ☃ \u{301}",
            "",
        ] {
            let caller: std::net::IpAddr = "169.254.170.23".parse().expect("ip");
            tracing::info!(
                target: "imdsd::access",
                method = %http::Method::GET,
                path = "/latest/meta-data/iam/security-credentials/app",
                caller = %caller,
                container = Some("web-1"),
                container_id = None::<&str>,
                role = "arn:aws:iam::123456789012:role/app",
                refused = ?Some("AccessDenied"),
                status = 200u16,
                micros = 17u64,
                negative = -3i64,
                flag = true,
                agent,
            );
        }
    }

    fn text_general() -> Format<tracing_subscriber::fmt::format::Full, At> {
        tracing_subscriber::fmt::format()
            .with_timer(AT)
            .with_ansi(false)
    }

    #[test]
    fn a_throttle_writes_a_few_lines_a_second_and_counts_the_rest() {
        let throttle = Throttle::new(2);
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(None));
        assert_eq!(throttle.admit(t0), Some(None));
        for _ in 0..5 {
            assert_eq!(throttle.admit(t0 + Duration::from_millis(500)), None);
        }
        // The next window's first line says how many were left out, once.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(throttle.admit(t1), Some(Some(5)));
        assert_eq!(throttle.admit(t1), Some(None));
        assert_eq!(throttle.admit(t1), None);
    }

    #[test]
    fn text_access_lines_are_what_the_general_formatter_writes() {
        let general = Captured::default();
        let ours = Captured::default();
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .with_writer(general.clone())
                .with_ansi(false)
                .event_format(text_general())
                .finish(),
            emit_access_lines,
        );
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .with_writer(ours.clone())
                .with_ansi(false)
                .event_format(Lines::with_timer(text_general(), AT, false))
                .finish(),
            emit_access_lines,
        );
        let (general, ours) = (general.take(), ours.take());
        assert_eq!(ours.lines().count(), 3, "{ours}");
        assert!(
            ours.starts_with("2026-11-23T12:33:08.004050Z  INFO imdsd::access: method=GET "),
            "{ours}"
        );
        assert_eq!(ours, general);
    }

    #[test]
    fn json_access_lines_are_what_the_general_formatter_writes() {
        let json_general = || text_general().json().flatten_event(true);
        let general = Captured::default();
        let ours = Captured::default();
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .with_writer(general.clone())
                .fmt_fields(JsonFields::new())
                .event_format(json_general())
                .finish(),
            emit_access_lines,
        );
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .with_writer(ours.clone())
                .fmt_fields(JsonFields::new())
                .event_format(Lines::with_timer(json_general(), AT, true))
                .finish(),
            emit_access_lines,
        );
        let (general, ours) = (general.take(), ours.take());
        // serde_json and this module escape alike, so the bytes match, not only the values.
        assert_eq!(ours, general);
        let first: serde_json::Value =
            serde_json::from_str(ours.lines().next().expect("a line")).expect("JSON");
        assert_eq!(first["timestamp"], "2026-11-23T12:33:08.004050Z");
        assert_eq!(first["target"], "imdsd::access");
        assert_eq!(first["status"], 200);
        assert_eq!(first["caller"], "169.254.170.23");
        assert_eq!(first["refused"], "Some(\"AccessDenied\")");
        assert!(first.get("container_id").is_none(), "{first}");
        let second: serde_json::Value =
            serde_json::from_str(ours.lines().nth(1).expect("a line")).expect("JSON");
        assert_eq!(
            second["agent"],
            "quote\" backslash\\ tab\t newline\n bell\u{7} nul\0 é ☃ \u{301}"
        );
    }

    #[test]
    fn other_events_and_access_lines_in_a_span_go_to_the_general_formatter() {
        let ours = Captured::default();
        tracing::subscriber::with_default(
            tracing_subscriber::fmt()
                .with_writer(ours.clone())
                .with_ansi(false)
                .fmt_fields(DefaultFields::new())
                .event_format(Lines::with_timer(text_general(), AT, false))
                .finish(),
            || {
                tracing::info!(target: "imdsd::app", addr = "127.0.0.1:80", "serving");
                let span = tracing::info_span!("conn", peer = 7);
                let _entered = span.enter();
                tracing::info!(target: "imdsd::access", status = 200u16);
            },
        );
        let text = ours.take();
        assert!(
            text.contains("INFO imdsd::app: serving addr=\"127.0.0.1:80\"\n"),
            "{text}"
        );
        assert!(
            text.contains("INFO conn{peer=7}: imdsd::access: status=200\n"),
            "{text}"
        );
    }

    /// An SDK's credentials GET, as the repeat filter sees it.
    const CREDS_LINE: [&str; 4] = [
        "GET",
        "/latest/meta-data/iam/security-credentials/app",
        "200",
        "sdk",
    ];

    #[test]
    fn identical_lines_beyond_the_burst_are_counted_not_written() {
        let filter = RepeatFilter::default();
        let three = RepeatLimits::new(3);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let creds = CREDS_LINE;
        let write = |suppressed| Verdict::Write { suppressed };
        // Three a second: the fourth and fifth identical ones are left out.
        for ms in [0, 1, 2] {
            assert_eq!(filter.check(&three, creds, at(ms)), write(0));
        }
        assert_eq!(filter.check(&three, creds, at(3)), Verdict::Skip);
        assert_eq!(filter.check(&three, creds, at(4)), Verdict::Skip);
        // A different line (another status, path, method or agent) is always written, and
        // reports what was left out before it.
        let denied = [
            "GET",
            "/latest/meta-data/iam/security-credentials/app",
            "401",
            "sdk",
        ];
        assert_eq!(filter.check(&three, denied, at(5)), write(2));
        // Four more different lines: each written, each remembered in place of the line whose
        // window began longest ago (so `creds`, then `denied`, are forgotten).
        for other in [
            ["HEAD", creds[1], "200", "sdk"],
            [
                "GET",
                "/latest/meta-data/iam/security-credentials/",
                "200",
                "sdk",
            ],
            ["GET", creds[1], "200", "other-sdk"],
            // Not the same line with the separator moved between fields.
            [
                "GET",
                "/latest/meta-data/iam/security-credentials/app\u{0}200",
                "",
                "sdk",
            ],
        ] {
            assert_eq!(filter.check(&three, other, at(6)), write(0), "{other:?}");
        }
        // `creds` was forgotten: a new line again, with a new burst.
        for ms in [7, 8, 9] {
            assert_eq!(filter.check(&three, creds, at(ms)), write(0));
        }
        assert_eq!(filter.check(&three, creds, at(10)), Verdict::Skip);
        // A second after the window began, the burst is available again.
        assert_eq!(filter.check(&three, creds, at(1_008)), write(1));
        // 0 writes everything.
        let all = RepeatLimits::new(0);
        for ms in 0..10 {
            assert_eq!(filter.check(&all, creds, at(2_000 + ms)), write(0));
        }
    }

    #[test]
    fn a_loop_of_a_few_different_lines_is_kept_down_too() {
        // An SDK client made anew for every call: token PUT, role listing, credentials GET, in a
        // loop. Each line is one of the caller's last few, so each is held to the burst.
        let filter = RepeatFilter::default();
        let three = RepeatLimits::new(3);
        let t0 = three.since;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let sdk = [
            ["PUT", "/latest/api/token", "200", "sdk"],
            [
                "GET",
                "/latest/meta-data/iam/security-credentials/",
                "200",
                "sdk",
            ],
            CREDS_LINE,
        ];
        let written = (0..100u64)
            .flat_map(|i| sdk.map(|line| (i, line)))
            .filter(|&(i, line)| filter.check(&three, line, at(i)) != Verdict::Skip)
            .count();
        assert_eq!(written, 9, "three of each of the three lines");
        // The next second: written again, and the first line reports the 291 left out.
        assert_eq!(
            filter.check(&three, sdk[0], at(1_000)),
            Verdict::Write { suppressed: 291 }
        );
        assert_eq!(
            filter.check(&three, sdk[1], at(1_000)),
            Verdict::Write { suppressed: 0 }
        );
    }

    #[test]
    fn callers_in_a_loop_share_ten_times_the_burst() {
        let limits = RepeatLimits::new(2);
        let t0 = limits.since;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let creds = CREDS_LINE;
        let callers: Vec<RepeatFilter> = (0..30).map(|_| RepeatFilter::default()).collect();
        let write = |suppressed| Verdict::Write { suppressed };
        // Each caller's first line differs from its (absent) last one: all 30 are written, and
        // none is taken from the shared 20.
        for filter in &callers {
            assert_eq!(filter.check(&limits, creds, at(0)), write(0));
        }
        // Their repeats: 20 (10 × 2) of them from all callers together in this second, not 30.
        let written = callers
            .iter()
            .filter(|f| f.check(&limits, creds, at(10)) != Verdict::Skip)
            .count();
        assert_eq!(written, 20);
        // The ten left out have no room left this second either…
        for filter in &callers[20..] {
            assert_eq!(filter.check(&limits, creds, at(20)), Verdict::Skip);
        }
        // …but a caller whose line differs from its last one is written all the same.
        let denied = ["GET", creds[1], "401", "sdk"];
        assert_eq!(callers[29].check(&limits, denied, at(30)), write(2));
        // The next second has room again, and the line reports what was left out.
        assert_eq!(callers[25].check(&limits, creds, at(1_100)), write(2));
    }

    #[test]
    fn timestamps_are_rfc3339_microseconds_across_second_boundaries() {
        let mut s = String::new();
        for micros in [
            0,
            999_999,
            1_000_000,
            1_795_437_188_004_050,
            1_795_437_188_999_999,
            1_795_437_189_000_001,
        ] {
            UtcMicros::write(&mut s, Duration::from_micros(micros)).expect("format");
            s.push('|');
        }
        assert_eq!(
            s,
            "1970-01-01T00:00:00.000000Z|1970-01-01T00:00:00.999999Z|\
             1970-01-01T00:00:01.000000Z|2026-11-23T12:33:08.004050Z|\
             2026-11-23T12:33:08.999999Z|2026-11-23T12:33:09.000001Z|"
        );
        let mut now = String::new();
        UtcMicros
            .format_time(&mut Writer::new(&mut now))
            .expect("now");
        assert_eq!(now.len(), "2026-11-23T12:33:08.004050Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[19] == b'.', "{now}");
    }
}
