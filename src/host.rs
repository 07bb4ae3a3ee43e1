//! The Host rule every listener applies (metadata, container-credentials, admin): the guard
//! against DNS rebinding. A web page can point a name of its own at 127.0.0.1 (or at the metadata
//! address) and then read imdsd's answers as same-origin; what it cannot do is make the browser
//! send anything but its own name as `Host`. So a request is served only when its `Host` (and the
//! authority of an absolute-form request target, `GET http://name/… HTTP/1.1`) is absent or empty,
//! an IP literal (a dotted quad, or IPv6 in brackets) with or without a port, `localhost`, one of
//! EC2's own names for the service (`instance-data`, `instance-data.ec2.internal`), or a name the
//! operator lists with `--allowed-host`. More than one `Host` header is a bad request.
//!
//! It owns the accepted names ([`AllowedHosts`]), their validation, and the check; each listener
//! decides how a refusal looks on its wire and in its log. The check is on every request's path,
//! so it allocates nothing, and an IP literal (what every SDK sends) is recognised in one pass.
//!
//! Numeric forms that are not dotted quads (`2130706433`, `0x7f.1`, `127.1`, `0177.0.0.1`) are
//! refused: no SDK sends them, and browsers rewrite every such form to the dotted quad before
//! sending it, so refusing them cannot block a client and accepting them would only widen what
//! counts as "an address".

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};

/// The names accepted without being listed: loopback's, and EC2's own for the service.
const BUILT_IN: [&str; 3] = ["localhost", "instance-data", "instance-data.ec2.internal"];

/// The metadata service's address, as SDKs send it when left to their defaults.
const EC2_ADDRESS: &[u8] = b"169.254.169.254";

/// How much of a refused value the logs show.
const SHOWN_BYTES: usize = 64;

/// The names a request may carry as `Host` besides IP literals and [`BUILT_IN`]: the operator's
/// (`--allowed-host`), lower-case, without a final dot. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    names: Arc<[Box<str>]>,
}

/// The `Host` headers of a request, gathered in the pass its listener already makes over the
/// headers (see [`HostHeaders::saw`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct HostHeaders<'a> {
    first: Option<&'a HeaderValue>,
    more: bool,
}

impl<'a> HostHeaders<'a> {
    /// Notes one `Host` header.
    #[inline]
    pub fn saw(&mut self, value: &'a HeaderValue) {
        if self.first.is_none() {
            self.first = Some(value);
        } else {
            self.more = true;
        }
    }

    /// The `Host` headers of `headers`, for a listener that makes no pass of its own.
    pub fn of(headers: &'a HeaderMap) -> Self {
        let mut hosts = Self::default();
        for value in headers.get_all(HOST) {
            hosts.saw(value);
        }
        hosts
    }
}

/// Why a request was refused, with the value at fault (as the client sent it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused<'a> {
    /// More than one `Host` header (the first one's value): 400.
    Duplicate(&'a [u8]),
    /// A `Host` header, or an absolute-form request target's authority, that is neither an IP
    /// literal nor an accepted name: 403.
    NotAllowed(&'a [u8]),
}

impl Refused<'_> {
    pub fn status(&self) -> StatusCode {
        match self {
            Refused::Duplicate(_) => StatusCode::BAD_REQUEST,
            Refused::NotAllowed(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The value at fault, for a log line: at most 64 bytes of it, bytes outside printable
    /// ASCII (and `\`) written as `\xNN`, and `…` when it was cut.
    pub fn shown(&self) -> String {
        let (Refused::Duplicate(value) | Refused::NotAllowed(value)) = *self;
        shown(value)
    }
}

/// `value` made safe and short for a log line: see [`Refused::shown`].
pub fn shown(value: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(value.len().min(SHOWN_BYTES) + 3);
    for &b in value.iter().take(SHOWN_BYTES) {
        if (b' '..=b'~').contains(&b) && b != b'\\' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if value.len() > SHOWN_BYTES {
        out.push('…');
    }
    out
}

impl AllowedHosts {
    /// The operator's names, validated: every problem, one message each (naming the value and
    /// the fix). IP literals are accepted and dropped: every address is allowed anyway.
    pub fn new<S: AsRef<str>>(names: &[S]) -> Result<Self, Vec<String>> {
        let mut kept: Vec<Box<str>> = Vec::new();
        let mut problems = Vec::new();
        for name in names {
            match parse_name(name.as_ref()) {
                Ok(Some(n)) if !kept.contains(&n) => kept.push(n),
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(Self { names: kept.into() })
        } else {
            Err(problems)
        }
    }

    /// The operator's names, as compared.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }

    /// Checks a request's `Host` headers and, for an absolute-form target, its authority.
    #[inline]
    pub fn check<'a>(&self, hosts: &HostHeaders<'a>, uri: &'a Uri) -> Result<(), Refused<'a>> {
        if let Some(host) = hosts.first {
            if hosts.more {
                return Err(Refused::Duplicate(host.as_bytes()));
            }
            if !self.allows(host.as_bytes()) {
                return Err(Refused::NotAllowed(host.as_bytes()));
            }
        }
        if let Some(authority) = uri.authority() {
            // `user@host` is an authority too; the host is what a rebinding page would name.
            let a = authority.as_str();
            let host = a.rsplit_once('@').map_or(a, |(_, host)| host).as_bytes();
            if !self.allows(host) {
                return Err(Refused::NotAllowed(host));
            }
        }
        Ok(())
    }

    /// [`AllowedHosts::check`] for a request whose headers were not scanned yet.
    pub fn check_request<'a, B>(&self, request: &'a Request<B>) -> Result<(), Refused<'a>> {
        self.check(&HostHeaders::of(request.headers()), request.uri())
    }

    /// Whether one `Host` value (`host[:port]`) is accepted.
    #[inline]
    pub fn allows(&self, host: &[u8]) -> bool {
        // What SDKs send by default, and nearly every request carries: compared whole, in line,
        // which costs less than reading it as an address.
        host == EC2_ADDRESS || self.allows_parsed(host)
    }

    /// [`AllowedHosts::allows`] for anything but [`EC2_ADDRESS`].
    fn allows_parsed(&self, host: &[u8]) -> bool {
        match host.first() {
            None => return true,
            // What every SDK sends: 169.254.169.254, 127.0.0.1:8169. A name may start with a
            // digit too, so one that is not an address goes on to the names.
            Some(b'0'..=b'9') if is_ipv4_with_port(host) => return true,
            Some(b'[') => return is_ipv6_with_port(host),
            Some(_) => {}
        }
        let name = match host.iter().rposition(|&b| b == b':') {
            Some(colon) if is_port(&host[colon + 1..]) => &host[..colon],
            Some(_) => return false,
            None => host,
        };
        let name = name.strip_suffix(b".").unwrap_or(name);
        !name.is_empty()
            && (BUILT_IN
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
                || self
                    .names
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_bytes())))
    }
}

/// A dotted quad (four decimal parts of 0 to 255, without leading zeros), then an optional port;
/// in one pass over the bytes.
fn is_ipv4_with_port(s: &[u8]) -> bool {
    // Dots seen, and the current part's value and digits.
    let (mut dots, mut value, mut digits) = (0u8, 0u32, 0u8);
    let mut bytes = s.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'0'..=b'9' => {
                // "0" is a part; "01" is not (an octal form to some parsers).
                if digits == 1 && value == 0 {
                    return false;
                }
                value = value * 10 + u32::from(b - b'0');
                digits += 1;
                // Also ends overlong parts: four digits without a leading zero exceed 255.
                if value > 255 {
                    return false;
                }
            }
            b'.' if digits > 0 && dots < 3 => (dots, value, digits) = (dots + 1, 0, 0),
            b':' if digits > 0 && dots == 3 => return is_port(bytes.as_slice()),
            _ => return false,
        }
    }
    digits > 0 && dots == 3
}

/// `[v6]`, then an optional port.
fn is_ipv6_with_port(s: &[u8]) -> bool {
    let Some(close) = s.iter().position(|&b| b == b']') else {
        return false;
    };
    std::str::from_utf8(&s[1..close]).is_ok_and(|inner| inner.parse::<Ipv6Addr>().is_ok())
        && port_or_nothing(&s[close + 1..])
}

/// Nothing, or `:` and a port.
fn port_or_nothing(rest: &[u8]) -> bool {
    match rest {
        [] => true,
        [b':', port @ ..] => is_port(port),
        _ => false,
    }
}

/// 1 to 5 digits, at most 65535.
fn is_port(digits: &[u8]) -> bool {
    (1..=5).contains(&digits.len())
        && digits.iter().all(u8::is_ascii_digit)
        && digits
            .iter()
            .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
            <= u32::from(u16::MAX)
}

/// One `--allowed-host` value: `Some(name)` to compare with, `None` for an IP literal (always
/// accepted), or what is wrong with it.
fn parse_name(raw: &str) -> Result<Option<Box<str>>, String> {
    const HOW: &str = "give a host name such as \"imdsd\" (a compose service name)";
    let value = raw.trim();
    if value.is_empty() {
        return Err(format!("{raw:?} is empty; {HOW}, or leave the option out"));
    }
    let bare_ip = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    if bare_ip.parse::<IpAddr>().is_ok() {
        return Ok(None);
    }
    if value.contains("://") || value.contains('/') {
        return Err(format!(
            "{value:?} is not a host name; write the name alone, without scheme or path, e.g. \"imdsd\""
        ));
    }
    if let Some((name, port)) = value.rsplit_once(':') {
        return Err(format!(
            "{value:?} has a port ({port}); write the name alone ({name:?}): it is accepted with any port"
        ));
    }
    let name = value.strip_suffix('.').unwrap_or(value);
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{value:?} contains {bad:?}; a host name has only letters, digits, '-', '_' and '.' \
             (there are no wildcards: list each name)"
        ));
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!(
            "{value:?} has an empty label (a leading dot or two dots in a row); {HOW}"
        ));
    }
    if name.len() > 253 || name.split('.').any(|label| label.len() > 63) {
        return Err(format!(
            "{value:?} is longer than DNS allows (63 characters a label, 253 in all)"
        ));
    }
    Ok(Some(name.to_ascii_lowercase().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> AllowedHosts {
        AllowedHosts::new(names).expect("valid names")
    }

    /// The check a listener makes, on a request built from `target` and its `Host` headers.
    fn check(allowed: &AllowedHosts, target: &str, host_headers: &[&str]) -> Result<(), String> {
        let mut request = Request::get(target);
        for h in host_headers {
            request = request.header(HOST, *h);
        }
        let request = request.body(()).expect("request");
        allowed
            .check_request(&request)
            .map_err(|r| format!("{} {}", r.status().as_u16(), r.shown()))
    }

    #[test]
    fn addresses_and_the_built_in_names_are_accepted_with_or_without_a_port() {
        let allowed = AllowedHosts::default();
        for host in [
            "",
            "169.254.169.254",
            "169.254.169.254:80",
            "127.0.0.1:8169",
            "127.0.0.1:80",
            "0.0.0.0",
            "255.255.255.255:65535",
            "10.0.0.1:0",
            "[::1]",
            "[::1]:8169",
            "[fd00:ec2::254]",
            "[fd00:ec2::254]:80",
            "[::ffff:127.0.0.1]:80",
            "localhost",
            "localhost:8169",
            "LOCALHOST.",
            "LocalHost.:9169",
            "instance-data",
            "instance-data.ec2.internal",
            "Instance-Data.EC2.Internal.:80",
        ] {
            assert!(allowed.allows(host.as_bytes()), "{host:?} is refused");
        }
    }

    #[test]
    fn names_and_numbers_that_are_not_dotted_quads_are_refused() {
        let allowed = AllowedHosts::default();
        for host in [
            "attacker.example.com",
            "attacker.example.com:8169",
            "127.0.0.1.nip.io",
            "169.254.169.254.nip.io:80",
            // Numeric forms browsers rewrite to dotted quads before sending: never sent as is.
            "0x7f.1",
            "0x7f000001",
            "2130706433",
            "127.1",
            "0177.0.0.1",
            "127.000.000.001",
            "127.0.0.01",
            "256.0.0.1",
            "1.2.3.4.5",
            "127.0.0.1.",
            // IPv6 must be bracketed (otherwise its last group reads as a port).
            "fd00:ec2::254",
            "::1",
            "[fd00:ec2::254",
            "[not-an-address]",
            "[::1]x",
            "[::1]:",
            "[::1]:80:80",
            // Ports are digits, and fit in 16 bits.
            "127.0.0.1:",
            "127.0.0.1:http",
            "127.0.0.1:65536",
            "127.0.0.1:123456",
            "127.0.0.1:+80",
            "localhost:",
            "localhost:8o",
            // Names: exactly, with at most one final dot.
            "localhost..",
            ".localhost",
            "sub.localhost",
            "localhost.attacker.example.com",
            "instance-data.ec2.internal.evil",
            ".",
            ":80",
            "local host",
            "localhost\0",
        ] {
            assert!(!allowed.allows(host.as_bytes()), "{host:?} is accepted");
        }
    }

    #[test]
    fn the_operators_names_are_accepted_in_any_case_with_any_port() {
        let allowed = hosts(&["imdsd", "Metadata.Internal.", "app_1"]);
        assert_eq!(
            allowed.names().collect::<Vec<_>>(),
            ["imdsd", "metadata.internal", "app_1"]
        );
        for host in [
            "imdsd",
            "IMDSD:80",
            "imdsd.",
            "metadata.internal:8169",
            "METADATA.INTERNAL.",
            "app_1",
        ] {
            assert!(allowed.allows(host.as_bytes()), "{host:?} is refused");
        }
        for host in ["imdsd2", "imdsd..", "x.imdsd", "metadata", "internal"] {
            assert!(!allowed.allows(host.as_bytes()), "{host:?} is accepted");
        }
        assert!(!AllowedHosts::default().allows(b"imdsd"));
    }

    #[test]
    fn a_request_is_checked_by_its_host_headers_and_its_absolute_target() {
        let allowed = hosts(&["imdsd"]);
        let creds = "/latest/meta-data/iam/security-credentials/app";
        assert_eq!(check(&allowed, creds, &[]), Ok(()), "HTTP/1.0: no Host");
        assert_eq!(check(&allowed, creds, &["169.254.169.254"]), Ok(()));
        assert_eq!(check(&allowed, creds, &["imdsd:80"]), Ok(()));
        assert_eq!(
            check(&allowed, creds, &["attacker.example.com"]),
            Err("403 attacker.example.com".into())
        );
        assert_eq!(
            check(&allowed, creds, &["169.254.169.254", "169.254.169.254"]),
            Err("400 169.254.169.254".into()),
            "two Host headers, even equal ones"
        );
        assert_eq!(
            check(&allowed, creds, &["attacker.example.com", "127.0.0.1"]),
            Err("400 attacker.example.com".into())
        );
        // Absolute form: the authority counts as a Host of its own.
        let absolute = format!("http://169.254.169.254{creds}");
        assert_eq!(check(&allowed, &absolute, &["169.254.169.254"]), Ok(()));
        assert_eq!(check(&allowed, &absolute, &[]), Ok(()));
        let rebound = format!("http://attacker.example.com:80{creds}");
        assert_eq!(
            check(&allowed, &rebound, &["169.254.169.254"]),
            Err("403 attacker.example.com:80".into())
        );
        assert_eq!(
            check(&allowed, &absolute, &["attacker.example.com"]),
            Err("403 attacker.example.com".into())
        );
        let with_user = format!("http://user@attacker.example.com{creds}");
        assert_eq!(
            check(&allowed, &with_user, &[]),
            Err("403 attacker.example.com".into())
        );
        assert_eq!(
            check(&allowed, &format!("http://user@imdsd{creds}"), &[]),
            Ok(())
        );
    }

    #[test]
    fn refused_values_are_shown_short_and_escaped() {
        assert_eq!(shown(b"attacker.example.com"), "attacker.example.com");
        assert_eq!(shown(b"a\"b\\c\x01\xff"), "a\"b\\x5cc\\x01\\xff");
        let long = "a".repeat(200);
        let s = shown(long.as_bytes());
        assert_eq!(s, format!("{}…", &long[..64]));
    }

    #[test]
    fn bad_names_are_reported_with_the_fix() {
        assert_eq!(
            hosts(&["127.0.0.1", "[fd00:ec2::254]", "::1"])
                .names()
                .count(),
            0
        );
        let err = |name: &str| {
            let problems = AllowedHosts::new(&[name]).expect_err(name);
            assert_eq!(problems.len(), 1, "{problems:?}");
            problems[0].clone()
        };
        assert!(
            err("imdsd:8169").contains("has a port (8169)"),
            "{}",
            err("imdsd:8169")
        );
        assert!(err("imdsd:8169").contains("\"imdsd\""));
        assert!(err("").contains("is empty"));
        assert!(err("  ").contains("is empty"));
        assert!(err("*.example.com").contains("contains '*'"));
        assert!(err("*.example.com").contains("no wildcards"));
        assert!(err("my host").contains("contains ' '"));
        assert!(err("http://imdsd").contains("without scheme"));
        assert!(err("a..b").contains("empty label"));
        assert!(err(".imdsd").contains("empty label"));
        assert!(err(&"a".repeat(64)).contains("longer than DNS allows"));
        let problems = AllowedHosts::new(&["ok", "bad:1", "", "also ok"]).expect_err("two bad");
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
