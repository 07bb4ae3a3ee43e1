//! Response bytes exactly as EC2 sends them: the XHTML error pages, the headers every response
//! carries, and the pretty-printed JSON style of IMDS documents (`"Key" : "value"`, two-space
//! indent, no final newline).

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

pub type Body = Full<Bytes>;

pub const TOKEN_TTL_HEADER: HeaderName =
    HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds");
pub const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-aws-ec2-metadata-token");

const SERVER: HeaderValue = HeaderValue::from_static("EC2ws");
const CLOSE: HeaderValue = HeaderValue::from_static("close");
const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain");
const TEXT_HTML: HeaderValue = HeaderValue::from_static("text/html");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
const NO_RANGES: HeaderValue = HeaderValue::from_static("none");
pub const ALLOW_METADATA: HeaderValue = HeaderValue::from_static("OPTIONS, GET, HEAD");
pub const ALLOW_TOKEN: HeaderValue = HeaderValue::from_static("OPTIONS, PUT");

/// The content type of a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// Everything in IMDS, JSON documents included.
    Text,
    /// `user-data` only.
    Binary,
}

/// Whether responses close the connection, as EC2's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    Close,
    KeepAlive,
}

/// The XHTML error page EC2 serves, byte for byte (the 404 is 339 bytes).
pub fn error_page(status: StatusCode) -> Bytes {
    let title = format!(
        "{} - {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    Bytes::from(format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
         <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
         \t\t \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
         <head>\n  \
         <title>{title}</title>\n \
         </head>\n \
         <body>\n  \
         <h1>{title}</h1>\n \
         </body>\n\
         </html>\n"
    ))
}

/// Pre-rendered error pages, so an error costs no formatting.
#[derive(Debug, Clone)]
pub struct ErrorPages {
    pub bad_request: Bytes,
    pub unauthorized: Bytes,
    pub forbidden: Bytes,
    pub not_found: Bytes,
    pub method_not_allowed: Bytes,
    pub expectation_failed: Bytes,
    pub internal_error: Bytes,
    pub unavailable: Bytes,
}

impl Default for ErrorPages {
    fn default() -> Self {
        Self {
            bad_request: error_page(StatusCode::BAD_REQUEST),
            unauthorized: error_page(StatusCode::UNAUTHORIZED),
            forbidden: error_page(StatusCode::FORBIDDEN),
            not_found: error_page(StatusCode::NOT_FOUND),
            method_not_allowed: error_page(StatusCode::METHOD_NOT_ALLOWED),
            expectation_failed: error_page(StatusCode::EXPECTATION_FAILED),
            internal_error: error_page(StatusCode::INTERNAL_SERVER_ERROR),
            unavailable: error_page(StatusCode::SERVICE_UNAVAILABLE),
        }
    }
}

impl ErrorPages {
    pub fn get(&self, status: StatusCode) -> Bytes {
        match status {
            StatusCode::BAD_REQUEST => self.bad_request.clone(),
            StatusCode::UNAUTHORIZED => self.unauthorized.clone(),
            StatusCode::FORBIDDEN => self.forbidden.clone(),
            StatusCode::NOT_FOUND => self.not_found.clone(),
            StatusCode::METHOD_NOT_ALLOWED => self.method_not_allowed.clone(),
            StatusCode::EXPECTATION_FAILED => self.expectation_failed.clone(),
            StatusCode::SERVICE_UNAVAILABLE => self.unavailable.clone(),
            StatusCode::INTERNAL_SERVER_ERROR => self.internal_error.clone(),
            // Rare (502 and 504 in proxy mode): made when needed.
            other => error_page(other),
        }
    }
}

/// Builds responses with the headers every IMDS response carries.
#[derive(Debug, Clone)]
pub struct Responder {
    pages: ErrorPages,
    connection: Connection,
    /// `Last-Modified` for the static tree: when the daemon started.
    started: HeaderValue,
}

impl Responder {
    pub fn new(connection: Connection, started: SystemTime) -> Self {
        Self {
            pages: ErrorPages::default(),
            connection,
            started: http_date(started),
        }
    }

    fn base(&self, status: StatusCode, body: Bytes, content_type: HeaderValue) -> Response<Body> {
        let len = body.len();
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = status;
        // Room for every header a response gets (up to eight), so that none grows the map.
        *res.headers_mut() = HeaderMap::with_capacity(8);
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, content_type);
        // Set explicitly so that HEAD answers carry the length GET would have.
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(header::SERVER, SERVER);
        if self.connection == Connection::Close {
            h.insert(header::CONNECTION, CLOSE);
        }
        res
    }

    /// A 200 with a metadata value or listing.
    pub fn ok(
        &self,
        body: Bytes,
        content_type: ContentType,
        last_modified: Option<SystemTime>,
    ) -> Response<Body> {
        let last_modified = last_modified.map_or_else(|| self.started.clone(), http_date);
        self.ok_dated(body, content_type, last_modified)
    }

    /// [`Responder::ok`] with `Last-Modified` already formatted.
    pub fn ok_dated(
        &self,
        body: Bytes,
        content_type: ContentType,
        last_modified: HeaderValue,
    ) -> Response<Body> {
        let ct = match content_type {
            ContentType::Text => TEXT_PLAIN,
            ContentType::Binary => OCTET_STREAM,
        };
        let mut res = self.base(StatusCode::OK, body, ct);
        let h = res.headers_mut();
        h.insert(header::ACCEPT_RANGES, NO_RANGES);
        h.insert(header::LAST_MODIFIED, last_modified);
        res
    }

    /// An upstream's answer passed on (proxy mode): its status, content type and bytes, with
    /// imdsd's connection handling.
    pub fn forwarded(
        &self,
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    ) -> Response<Body> {
        self.base(status, body, content_type.unwrap_or(TEXT_PLAIN))
    }

    /// An error page.
    pub fn error(&self, status: StatusCode) -> Response<Body> {
        self.base(status, self.pages.get(status), TEXT_HTML)
    }

    /// 405, with EC2's nginx-style reason phrase and the methods the path allows.
    pub fn method_not_allowed(&self, allow: HeaderValue) -> Response<Body> {
        let mut res = self.error(StatusCode::METHOD_NOT_ALLOWED);
        res.headers_mut().insert(header::ALLOW, allow);
        res.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Not Allowed"));
        res
    }

    /// A freshly issued IMDSv2 token, with the granted TTL echoed (the Rust and Go SDKs require it).
    pub fn token(&self, token: Bytes, ttl: u32) -> Response<Body> {
        let mut res = self.base(StatusCode::OK, token, TEXT_PLAIN);
        res.headers_mut()
            .insert(TOKEN_TTL_HEADER, HeaderValue::from(ttl));
        res
    }

    /// The answer to `OPTIONS`: the allowed methods and nothing else.
    pub fn options(&self, allow: HeaderValue) -> Response<Body> {
        let mut res = self.base(StatusCode::OK, Bytes::new(), TEXT_PLAIN);
        res.headers_mut().insert(header::ALLOW, allow);
        res
    }
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`). A cached credentials GET does not format
/// one: its `Last-Modified` is made with the credentials' document (`broker::Document`).
pub fn http_date(t: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap_or(HeaderValue::from_static(""))
}

/// Writes an IMDS-style JSON object: one `"Key" : value` per line, two-space indent, no final LF.
/// Values are JSON (strings quoted and escaped by the caller through [`json_str`]).
pub fn pretty_object(fields: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(
        fields
            .iter()
            .map(|(k, v)| k.len() + v.len() + 10)
            .sum::<usize>()
            + 4,
    );
    out.push_str("{\n");
    for (i, (key, value)) in fields.iter().enumerate() {
        out.push_str("  \"");
        out.push_str(key);
        out.push_str("\" : ");
        out.push_str(value);
        if i + 1 < fields.len() {
            out.push(',');
        }
        out.push('\n');
    }
    out.push('}');
    out
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn the_404_page_is_the_339_bytes_ec2_sends() {
        let page = error_page(StatusCode::NOT_FOUND);
        assert_eq!(page.len(), 339);
        let text = std::str::from_utf8(&page).expect("ascii");
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 11);
        assert_eq!(
            lines[2],
            "\t\t \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">"
        );
        assert_eq!(lines[4], " <head>");
        assert_eq!(lines[5], "  <title>404 - Not Found</title>");
        assert_eq!(lines[8], "  <h1>404 - Not Found</h1>");
        assert!(text.ends_with("</html>\n"));
    }

    #[test]
    fn pretty_objects_use_the_imds_style() {
        let doc = pretty_object(&[("Code", json_str("Success")), ("Nothing", "null".into())]);
        assert_eq!(doc, "{\n  \"Code\" : \"Success\",\n  \"Nothing\" : null\n}");
    }

    #[test]
    fn http_dates_follow_the_second_they_are_asked_for() {
        let at = |secs: u64, millis: u64| {
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        // Whole seconds: the milliseconds are dropped, not rounded.
        for (t, expected) in [
            (at(784_111_777, 0), "Sun, 06 Nov 1994 08:49:37 GMT"),
            (at(784_111_777, 999), "Sun, 06 Nov 1994 08:49:37 GMT"),
            (at(784_111_778, 1), "Sun, 06 Nov 1994 08:49:38 GMT"),
            (at(784_111_777, 500), "Sun, 06 Nov 1994 08:49:37 GMT"),
            (at(1_795_437_188, 4), "Mon, 23 Nov 2026 12:33:08 GMT"),
        ] {
            assert_eq!(http_date(t), expected);
        }
    }
}
