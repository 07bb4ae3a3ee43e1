//! STS for the tests: moto's server (the real STS wire protocol, from the test venv) and a small
//! scripted STS that speaks the same Query/XML protocol for what moto cannot do on demand:
//! AccessDenied, throttling, 500s, slow answers, broken answers, refused connections, chosen
//! expiries, and a record of every call.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

/// The operator's own identity in the daemon's environment: static keys that moto accepts.
pub const OPERATOR_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
    (
        "AWS_SECRET_ACCESS_KEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    ("AWS_REGION", "us-east-1"),
];

/// The daemon as a process on loopback against `sts`, with the operator's static keys; the state
/// directory lives as long as the returned guard.
pub fn sts_daemon(sts: &str, args: &[&str]) -> (super::common::Process, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("tempdir");
    let state_path = state.path().to_str().expect("utf8").to_string();
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state_path,
        "--sts-endpoint",
        sts,
    ];
    all.extend_from_slice(args);
    (super::common::Process::spawn(&all, OPERATOR_ENV), state)
}

/// moto's server on a free loopback port, stopped when dropped.
pub struct Moto {
    pub url: String,
    child: Child,
}

impl Moto {
    pub fn start() -> Moto {
        Self::start_on("127.0.0.1")
    }

    /// moto on `host` (e.g. a test network's gateway, so that containers can reach it).
    pub fn start_on(host: &str) -> Moto {
        let python = super::common::python();
        let port = free_port();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", host, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's server from the test venv");
        let url = format!("http://{host}:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((host, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto's server did not start on {url}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { url, child }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// What the scripted STS does with an AssumeRole call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Credentials valid for the scripted lifetime.
    Grant,
    /// 403 AccessDenied.
    Deny,
    /// 400 Throttling.
    Throttle,
    /// 500 InternalFailure.
    Fail,
    /// 502 with an HTML page, as a proxy or load balancer in front of STS would answer.
    BadGateway,
    /// 200 whose body is not XML at all.
    Garbage,
    /// 200 with a granted answer cut off in the middle.
    Truncated,
    /// 200, well-formed, with a `Credentials` element whose fields are all missing: what an SDK
    /// that fills in required fields turns into empty strings and the Unix epoch.
    EmptyCredentials,
}

/// One AssumeRole call as the scripted STS saw it.
#[derive(Debug, Clone)]
pub struct AssumeCall {
    pub role_arn: String,
    pub session_name: String,
    /// The access key id granted (every call gets its own), whatever the answer was.
    pub access_key_id: String,
    pub started: Instant,
    pub finished: Instant,
    /// AssumeRole calls being answered when this one arrived, itself included.
    pub in_flight: usize,
}

#[derive(Debug)]
struct Script {
    default: Behaviour,
    per_role: HashMap<String, Behaviour>,
    lifetime: Duration,
    delay: Duration,
    caller_arn: String,
    requests: Vec<HashMap<String, String>>,
    calls: Vec<AssumeCall>,
    in_flight: usize,
    /// Calls waiting at the gate now.
    held: usize,
    /// While `true`, AssumeRole calls are held (after being counted) until it turns `false`.
    gate: tokio::sync::watch::Sender<bool>,
}

/// A scripted STS endpoint on 127.0.0.1.
pub struct ScriptedSts {
    pub url: String,
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    assume_calls: Arc<AtomicUsize>,
    shutdown: Mutex<CancellationToken>,
}

impl ScriptedSts {
    pub async fn start() -> ScriptedSts {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let url = format!("http://{addr}");
        let script = Arc::new(Mutex::new(Script {
            default: Behaviour::Grant,
            per_role: HashMap::new(),
            lifetime: Duration::from_secs(3600),
            delay: Duration::ZERO,
            caller_arn: "arn:aws:iam::123456789012:user/operator".into(),
            requests: Vec::new(),
            calls: Vec::new(),
            in_flight: 0,
            held: 0,
            gate: tokio::sync::watch::channel(false).0,
        }));
        let assume_calls = Arc::new(AtomicUsize::new(0));
        let shutdown = serve(listener, script.clone(), assume_calls.clone());
        ScriptedSts {
            url,
            addr,
            script,
            assume_calls,
            shutdown: Mutex::new(shutdown),
        }
    }

    /// Stops listening and closes every connection: calls are refused until [`Self::resume`].
    pub fn refuse_connections(&self) {
        self.shutdown.lock().expect("lock").cancel();
    }

    /// Listens again on the same address, with the same script and records.
    pub async fn resume(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot listen on {} again: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let token = serve(listener, self.script.clone(), self.assume_calls.clone());
        *self.shutdown.lock().expect("lock") = token;
    }

    /// What AssumeRole does for role ARNs ending in `role_suffix` (or every role, with `None`).
    pub fn set(&self, role_suffix: Option<&str>, behaviour: Behaviour) {
        let mut s = self.script.lock().expect("lock");
        match role_suffix {
            Some(r) => {
                s.per_role.insert(r.to_string(), behaviour);
            }
            None => s.default = behaviour,
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.script.lock().expect("lock").delay = delay;
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        self.script.lock().expect("lock").lifetime = lifetime;
    }

    /// Makes GetCallerIdentity report a role session, so assumed roles are role chains.
    pub fn set_caller_arn(&self, arn: &str) {
        self.script.lock().expect("lock").caller_arn = arn.to_string();
    }

    pub fn assume_calls(&self) -> usize {
        self.assume_calls.load(Ordering::SeqCst)
    }

    /// Holds every AssumeRole call that arrives from now on (they are counted, and answered only
    /// after [`Self::release`]).
    pub fn hold(&self) {
        self.script.lock().expect("lock").gate.send_replace(true);
    }

    pub fn release(&self) {
        self.script.lock().expect("lock").gate.send_replace(false);
    }

    /// AssumeRole calls being answered (or held) right now.
    pub fn in_flight(&self) -> usize {
        self.script.lock().expect("lock").in_flight
    }

    /// AssumeRole calls held by [`Self::hold`] right now.
    pub fn held(&self) -> usize {
        self.script.lock().expect("lock").held
    }

    /// Every AssumeRole call answered so far, in the order they arrived, with when and how many
    /// at once.
    pub fn assume_log(&self) -> Vec<AssumeCall> {
        let mut calls = self.script.lock().expect("lock").calls.clone();
        calls.sort_by_key(|c| c.started);
        calls
    }

    /// The form parameters of every AssumeRole call so far.
    pub fn assume_requests(&self) -> Vec<HashMap<String, String>> {
        self.script
            .lock()
            .expect("lock")
            .requests
            .iter()
            .filter(|r| r.get("Action").map(String::as_str) == Some("AssumeRole"))
            .cloned()
            .collect()
    }
}

impl Drop for ScriptedSts {
    fn drop(&mut self) {
        if let Ok(token) = self.shutdown.lock() {
            token.cancel();
        }
    }
}

fn serve(
    listener: tokio::net::TcpListener,
    script: Arc<Mutex<Script>>,
    calls: Arc<AtomicUsize>,
) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let handler = Arc::new(move |_caller: IpAddr| {
        let (s, c) = (script.clone(), calls.clone());
        move |req: Request<Incoming>| {
            let (s, c) = (s.clone(), c.clone());
            async move { answer(req, s, c).await }
        }
    });
    tokio::spawn(imdsd::server::serve(
        listener,
        "scripted-sts",
        handler,
        imdsd::server::Connections::new(
            imdsd::server::ServerOptions {
                keep_alive: true,
                ..Default::default()
            },
            Arc::new(imdsd::metrics::Metrics::default()),
        ),
        shutdown.clone(),
    ));
    shutdown
}

async fn answer(
    req: Request<Incoming>,
    script: Arc<Mutex<Script>>,
    calls: Arc<AtomicUsize>,
) -> Response<Full<Bytes>> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form = parse_form(&String::from_utf8_lossy(&body));
    let action = form.get("Action").cloned().unwrap_or_default();
    let (behaviour, lifetime, delay, caller_arn) = {
        let mut s = script.lock().expect("lock");
        s.requests.push(form.clone());
        let role = form.get("RoleArn").cloned().unwrap_or_default();
        let behaviour = s
            .per_role
            .iter()
            .find(|(suffix, _)| role.ends_with(suffix.as_str()))
            .map_or(s.default, |(_, b)| *b);
        (behaviour, s.lifetime, s.delay, s.caller_arn.clone())
    };
    match action.as_str() {
        "GetCallerIdentity" => {
            let account = caller_arn
                .split(':')
                .nth(4)
                .unwrap_or("123456789012")
                .to_string();
            xml(
                StatusCode::OK,
                format!(
                    "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                     <GetCallerIdentityResult><Arn>{caller_arn}</Arn><UserId>AIDAEXAMPLE</UserId>\
                     <Account>{account}</Account></GetCallerIdentityResult>\
                     <ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata>\
                     </GetCallerIdentityResponse>"
                ),
            )
        }
        "AssumeRole" => {
            let started = Instant::now();
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let (in_flight, mut gate) = {
                let mut s = script.lock().expect("lock");
                s.in_flight += 1;
                (s.in_flight, s.gate.subscribe())
            };
            // Counted out also when the daemon gives up on the call (and the answer is dropped).
            let done = InFlight(script.clone());
            if *gate.borrow_and_update() {
                script.lock().expect("lock").held += 1;
                let _waiting = Held(script.clone());
                let _ = gate.wait_for(|held| !*held).await;
            }
            tokio::time::sleep(delay).await;
            drop(done);
            let role = form.get("RoleArn").cloned().unwrap_or_default();
            let session = form.get("RoleSessionName").cloned().unwrap_or_default();
            script.lock().expect("lock").calls.push(AssumeCall {
                role_arn: role.clone(),
                session_name: session.clone(),
                access_key_id: format!("ASIASCRIPTED{n:08}"),
                started,
                finished: Instant::now(),
                in_flight,
            });
            match behaviour {
                Behaviour::Grant | Behaviour::Truncated => {
                    let expiration =
                        humantime::format_rfc3339_seconds(SystemTime::now() + lifetime);
                    let name = role.rsplit('/').next().unwrap_or_default();
                    let account = role.split(':').nth(4).unwrap_or_default();
                    let mut body = format!(
                        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                             <AssumeRoleResult><Credentials>\
                             <AccessKeyId>ASIASCRIPTED{n:08}</AccessKeyId>\
                             <SecretAccessKey>scripted/secret/key/{n:020}</SecretAccessKey>\
                             <SessionToken>IQoJb3JpZ2luX2VjScriptedSessionToken{n}</SessionToken>\
                             <Expiration>{expiration}</Expiration></Credentials>\
                             <AssumedRoleUser><AssumedRoleId>AROAEXAMPLE:{session}</AssumedRoleId>\
                             <Arn>arn:aws:sts::{account}:assumed-role/{name}/{session}</Arn>\
                             </AssumedRoleUser></AssumeRoleResult>\
                             <ResponseMetadata><RequestId>r-{n}</RequestId></ResponseMetadata>\
                             </AssumeRoleResponse>"
                    );
                    if behaviour == Behaviour::Truncated {
                        // Cut inside the secret key: the access key id made it, nothing after.
                        let cut = body.find("<SecretAccessKey>").expect("secret") + 20;
                        body.truncate(cut);
                    }
                    xml(StatusCode::OK, body)
                }
                Behaviour::EmptyCredentials => xml(
                    StatusCode::OK,
                    "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                     <AssumeRoleResult><Credentials></Credentials></AssumeRoleResult>\
                     <ResponseMetadata><RequestId>r-empty</RequestId></ResponseMetadata>\
                     </AssumeRoleResponse>"
                        .to_string(),
                ),
                Behaviour::Garbage => {
                    let mut res = Response::new(Full::new(Bytes::from_static(
                        b"\x00\x9f\x92\x96 this is not XML {\"json\": maybe}",
                    )));
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/xml"),
                    );
                    res
                }
                Behaviour::BadGateway => {
                    let mut res = Response::new(Full::new(Bytes::from_static(
                        b"<html><head><title>502 Bad Gateway</title></head><body>\
                          <center><h1>502 Bad Gateway</h1></center></body></html>",
                    )));
                    *res.status_mut() = StatusCode::BAD_GATEWAY;
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/html"),
                    );
                    res
                }
                Behaviour::Deny => error(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    &format!(
                        "User: arn:aws:iam::123456789012:user/operator is not authorized to perform: \
                         sts:AssumeRole on resource: {role}"
                    ),
                ),
                Behaviour::Throttle => {
                    error(StatusCode::BAD_REQUEST, "Throttling", "Rate exceeded")
                }
                Behaviour::Fail => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalFailure",
                    "scripted outage",
                ),
            }
        }
        other => error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            &format!("unknown action {other}"),
        ),
    }
}

struct InFlight(Arc<Mutex<Script>>);

struct Held(Arc<Mutex<Script>>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.held -= 1;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.in_flight -= 1;
        }
    }
}

fn xml(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/xml"),
    );
    res
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let kind = if status.is_server_error() {
        "Receiver"
    } else {
        "Sender"
    };
    xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
             <Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error>\
             <RequestId>r-err</RequestId></ErrorResponse>"
        ),
    )
}

fn parse_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// One GET from a chosen loopback source address (127.0.0.x), for tests with several callers.
/// Returns (status, body).
pub async fn get_from(source: IpAddr, daemon: SocketAddr, path: &str) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind source address");
    let mut stream = socket.connect(daemon).await.expect("connect");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: imdsd-tests\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read");
    let response = super::common::parse_response(&bytes);
    (
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    )
}
