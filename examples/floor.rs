//! The floor for the benchmarks (`benches/imds.rs`, `scripts/bench`): the least a metadata server
//! can do to answer what an AWS SDK asks, so that imdsd's numbers can be read against it.
//!
//! A plain hyper 1 HTTP/1.1 server on a multi-threaded tokio runtime, set up like imdsd's own
//! listener (`src/server.rs`: title-case headers, the same buffer limit and header timer, no
//! Nagle, keep-alive on or off), answering three paths with fixed bytes and nothing else:
//!
//! - `PUT /latest/api/token` → a fixed 56-character token, the TTL echoed;
//! - `GET /latest/meta-data/iam/security-credentials/` → the role name;
//! - `GET /latest/meta-data/iam/security-credentials/<any role>` → the credentials document, the
//!   very bytes imdsd served (read from `--document`), with the headers imdsd sends.
//!
//! Responses carry the headers imdsd's do (`Server: EC2ws`, `Accept-Ranges`, `Last-Modified`, the
//! token TTL, `Connection: close` unless kept alive), so both put the same bytes on the wire. No
//! token check, no caller lookup, no cache, no metrics, no log: whatever imdsd spends beyond this
//! is the cost of being imdsd.
//!
//! ```sh
//! cargo run --release --example floor -- --listen 127.0.0.1:8170 --document doc.json --role app [--keep-alive]
//! ```
//!
//! It prints `listening on ADDR` once bound, and exits when its standard input closes (so a
//! benchmark that dies cannot leave it behind).

use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

const CREDENTIALS_PREFIX: &str = "/latest/meta-data/iam/security-credentials/";
const TOKEN: &str = "AQAEAFloorFloorFloorFloorFloorFloorFloorFloorFloorFloor==";
const LAST_MODIFIED: &str = "Thu, 01 Jan 2026 00:00:00 GMT";

struct Floor {
    keep_alive: bool,
    role: Bytes,
    document: Bytes,
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("a socket address");
    let mut document = None;
    let mut role = String::from("role");
    let mut keep_alive = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("--listen ADDR:PORT")
            }
            "--document" => document = Some(args.next().expect("--document FILE")),
            "--role" => role = args.next().expect("--role NAME"),
            "--keep-alive" => keep_alive = true,
            other => panic!("unknown argument {other:?}"),
        }
    }
    let document = match document {
        Some(path) => std::fs::read(&path).expect("read the credentials document"),
        None => b"{\n  \"Code\" : \"Success\"\n}".to_vec(),
    };
    let floor = Box::leak(Box::new(Floor {
        keep_alive,
        role: Bytes::from(role),
        document: Bytes::from(document),
    }));

    // Stop when the parent goes away.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });

    // The same runtime imdsd's binary builds: multi-threaded, one worker per core. As in imdsd
    // (`App::run`), the accept loop is a task on the workers, not `block_on`'s own thread: from
    // there every new connection would be handed across threads, costing a wake-up each.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(async move { tokio::spawn(serve(listen, floor)).await })
        .expect("the accept loop");
}

async fn serve(listen: SocketAddr, floor: &'static Floor) {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .expect("bind the listen address");
    println!(
        "listening on {}",
        listener.local_addr().expect("a local address")
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service_fn(move |req: Request<Incoming>| async move {
            Ok::<_, Infallible>(answer(floor, &req))
        });
        let conn = http1::Builder::new()
            .keep_alive(floor.keep_alive)
            .title_case_headers(true)
            .max_buf_size(8192)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5))
            .serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn answer(floor: &Floor, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let (status, body) = match (req.method(), path) {
        (&Method::PUT, "/latest/api/token") => {
            let ttl = req
                .headers()
                .get("x-aws-ec2-metadata-token-ttl-seconds")
                .cloned()
                .unwrap_or(HeaderValue::from_static("21600"));
            let mut res = response(floor, StatusCode::OK, Bytes::from_static(TOKEN.as_bytes()));
            res.headers_mut()
                .insert("x-aws-ec2-metadata-token-ttl-seconds", ttl);
            return res;
        }
        (&Method::GET, CREDENTIALS_PREFIX) => (StatusCode::OK, floor.role.clone()),
        (&Method::GET, p)
            if p.len() > CREDENTIALS_PREFIX.len() && p.starts_with(CREDENTIALS_PREFIX) =>
        {
            (StatusCode::OK, floor.document.clone())
        }
        _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found")),
    };
    let mut res = response(floor, status, body);
    let h = res.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("none"));
    h.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_static(LAST_MODIFIED),
    );
    // EC2 (and imdsd) tell a caller with a token how long it has left.
    if req.headers().contains_key("x-aws-ec2-metadata-token") {
        h.insert(
            "x-aws-ec2-metadata-token-ttl-seconds",
            HeaderValue::from_static("21600"),
        );
    }
    res
}

/// The headers every imdsd response carries.
fn response(floor: &Floor, status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let len = body.len();
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    if !floor.keep_alive {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}
