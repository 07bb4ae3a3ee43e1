//! `imdsd probe`: asks a metadata service for credentials exactly as an AWS SDK does (the Rust
//! SDK's own IMDS client and providers), optionally checks them with `sts:GetCallerIdentity`, and
//! prints what it got as one JSON line. Run it inside a container to see what that container
//! receives; the end-to-end tests use it as their in-container client.
//!
//! With `--every` it probes in rounds, one JSON line each, every round with a new SDK client, so
//! that each round asks the metadata service again (the SDK's providers cache credentials and
//! tokens; a new client has neither). The soak (`tests/soak.rs`) runs its callers this way.
//!
//! It never prints a secret: access keys are shown by their last four characters. Each line also
//! says which HTTP statuses the SDK's IMDS client met on the way, retries included, recorded in the
//! HTTP client under the SDK: a retried 503 leaves no other trace in what the SDK returns.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::imds::region::ImdsRegionProvider;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::ProvideCredentials as _;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `imdsd probe` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// The metadata service to ask. [default: http://169.254.169.254]
    #[arg(long, env = "AWS_EC2_METADATA_SERVICE_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,

    /// Also call sts:GetCallerIdentity with the credentials (AWS_ENDPOINT_URL_STS is honoured).
    #[arg(long)]
    pub sts: bool,

    /// Before probing, try this IMDSv2 token on the role listing and report the status (a token
    /// issued to another caller must get 401).
    #[arg(long, value_name = "TOKEN")]
    pub foreign_token: Option<String>,

    /// Use the container-credentials provider instead of IMDS (it reads
    /// AWS_CONTAINER_CREDENTIALS_RELATIVE_URI / _FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN).
    #[arg(long)]
    pub container: bool,

    /// Print a freshly issued IMDSv2 token in the output.
    #[arg(long)]
    pub print_token: bool,

    /// After probing, fetch the credentials this many more times (raw IMDSv2 requests).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub repeat: u32,

    /// Retry for up to this many seconds until credentials are obtained (e.g. while the metadata
    /// service starts next to this container).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub retry_for: u64,

    /// Keep running this many seconds after printing (so a container stays up).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub hold: u64,

    /// Probe in rounds, starting one this often (e.g. 3s), each with a new SDK client that asks
    /// the metadata service again, and print one JSON line per round. Stops at SIGTERM or SIGINT.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_duration,
        conflicts_with_all = ["foreign_token", "print_token", "repeat", "retry_for", "hold", "container"]
    )]
    pub every: Option<Duration>,

    /// With --every: stop after this long (e.g. 10m).
    #[arg(
        long = "for",
        id = "for",
        value_name = "DURATION",
        value_parser = parse_duration,
        requires = "every"
    )]
    pub run_for: Option<Duration>,
}

/// The longest one round may take; beyond it the round is reported as failed. The SDK's own
/// timeouts end a round long before this unless STS (the check) hangs.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than zero (e.g. 3s)".into()),
        Err(e) => Err(format!("{e} (e.g. 3s, 500ms, 10m)")),
    }
}

/// What the SDK's IMDS client met, attempt by attempt, for one probe.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Seen>>);

#[derive(Debug, Default)]
struct Seen {
    statuses: BTreeMap<u16, u32>,
    /// When each 5xx arrived (Unix milliseconds), so that it can be placed in time.
    server_errors_at_ms: Vec<u64>,
    /// Attempts that got no response at all (timeouts, refused or reset connections).
    transport_errors: u32,
}

impl Recorder {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, out: &mut serde_json::Map<String, Value>) {
        let seen = self.seen();
        let statuses: serde_json::Map<String, Value> = seen
            .statuses
            .iter()
            .map(|(status, n)| (status.to_string(), json!(n)))
            .collect();
        out.insert("http".into(), Value::Object(statuses));
        if !seen.server_errors_at_ms.is_empty() {
            out.insert("http_5xx_at_ms".into(), json!(seen.server_errors_at_ms));
        }
        if seen.transport_errors > 0 {
            out.insert("transport_errors".into(), json!(seen.transport_errors));
        }
    }

    /// One attempt's outcome: its status, or `None` when no response came at all.
    fn record(&self, status: Option<u16>) {
        let mut seen = self.seen();
        match status {
            Some(status) => {
                *seen.statuses.entry(status).or_default() += 1;
                if (500..600).contains(&status) {
                    seen.server_errors_at_ms.push(unix_ms(SystemTime::now()));
                }
            }
            None => seen.transport_errors += 1,
        }
    }
}

/// The SDK's own HTTP client (hyper 1 with rustls, what it picks by default), with every
/// response's status recorded on its way to the SDK: one record per request on the wire, retries
/// included, which nothing the SDK returns shows.
#[derive(Debug, Clone)]
struct RecordingClient {
    inner: SharedHttpClient,
    recorder: Recorder,
}

impl RecordingClient {
    fn new(recorder: Recorder) -> Self {
        let inner = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .build_https();
        Self { inner, recorder }
    }
}

impl HttpClient for RecordingClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(RecordingConnector {
            inner: self.inner.http_connector(settings, components),
            recorder: self.recorder.clone(),
        })
    }
}

#[derive(Debug)]
struct RecordingConnector {
    inner: SharedHttpConnector,
    recorder: Recorder,
}

impl HttpConnector for RecordingConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let call = self.inner.call(request);
        let recorder = self.recorder.clone();
        HttpConnectorFuture::new(async move {
            let result = call.await;
            recorder.record(result.as_ref().ok().map(|r| r.status().as_u16()));
            result
        })
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs the probe; returns the process exit code (0 when credentials were obtained, in every
/// round with `--every`).
pub async fn run(args: ProbeArgs) -> u8 {
    let endpoint = args
        .endpoint
        .clone()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "http://169.254.169.254".into());
    match args.every {
        Some(every) => run_rounds(&args, &endpoint, every).await,
        None => run_once(&args, &endpoint).await,
    }
}

async fn run_once(args: &ProbeArgs, endpoint: &str) -> u8 {
    let started = Instant::now();
    let mut out = serde_json::Map::new();
    out.insert("endpoint".into(), json!(endpoint));
    let deadline = Instant::now() + Duration::from_secs(args.retry_for);
    let recorder = Recorder::default();
    let mut outcome = probe(args, endpoint, &recorder, &mut out).await;
    while outcome.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        out.retain(|k, _| k == "endpoint");
        outcome = probe(args, endpoint, &recorder, &mut out).await;
    }
    recorder.report(&mut out);
    let code = match outcome {
        Ok(()) => 0,
        Err(e) => {
            out.insert("error".into(), json!(e));
            1
        }
    };
    out.insert("ok".into(), json!(code == 0));
    out.insert(
        "elapsed_ms".into(),
        json!(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
    );
    println!("{}", Value::Object(out));
    if args.hold > 0 {
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    code
}

/// `--every`: a round every `every` until `--for` is over or a signal comes. A round that is under
/// way when the signal comes is abandoned without a line (the container is going away).
async fn run_rounds(args: &ProbeArgs, endpoint: &str, every: Duration) -> u8 {
    let stop = stop_signal();
    tokio::pin!(stop);
    let until = args.run_for.map(|d| Instant::now() + d);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut all_ok = true;
    for round in 1u64.. {
        tokio::select! {
            () = &mut stop => break,
            _ = ticks.tick() => {}
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        let started = Instant::now();
        let mut out = serde_json::Map::new();
        out.insert("round".into(), json!(round));
        out.insert("at_ms".into(), json!(unix_ms(SystemTime::now())));
        let recorder = Recorder::default();
        let outcome = tokio::select! {
            () = &mut stop => break,
            r = tokio::time::timeout(ROUND_LIMIT, probe(args, endpoint, &recorder, &mut out)) => r,
        };
        let outcome =
            outcome.unwrap_or_else(|_| Err(format!("the round took longer than {ROUND_LIMIT:?}")));
        recorder.report(&mut out);
        if let Err(e) = &outcome {
            out.insert("error".into(), json!(e));
        }
        all_ok &= outcome.is_ok();
        out.insert("ok".into(), json!(outcome.is_ok()));
        out.insert(
            "elapsed_ms".into(),
            json!(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
        );
        println!("{}", Value::Object(out));
    }
    if all_ok { 0 } else { 1 }
}

/// Resolves at SIGTERM or SIGINT (`docker stop`: the probe is often PID 1, which gets no default
/// handler). Never resolves if the handlers cannot be installed; `--for` still ends the rounds.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

async fn probe(
    args: &ProbeArgs,
    endpoint: &str,
    recorder: &Recorder,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), String> {
    if args.container {
        return probe_container(args, out).await;
    }
    let authority = endpoint
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.to_string()))
        .ok_or_else(|| format!("{endpoint:?} is not an http URL"))?;

    if let Some(token) = &args.foreign_token {
        let (status, _) = raw(
            &authority,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            &[("x-aws-ec2-metadata-token", token)],
        )
        .await?;
        out.insert("foreign_token_status".into(), json!(status));
    }
    let token = if args.print_token || args.repeat > 0 {
        let (status, body) = raw(
            &authority,
            "PUT",
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
        )
        .await?;
        if status != 200 {
            return Err(format!("token PUT answered {status}"));
        }
        if args.print_token {
            out.insert("token".into(), json!(body));
        }
        Some(body)
    } else {
        None
    };

    let client = aws_config::imds::Client::builder()
        .configure(
            &ProviderConfig::default().with_http_client(RecordingClient::new(recorder.clone())),
        )
        .endpoint(endpoint)
        .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?
        .build();
    let role = client
        .get("/latest/meta-data/iam/security-credentials/")
        .await
        .map(|r| r.as_ref().to_string())
        .map_err(|e| format!("no role: {}", aws_sdk_sts::error::DisplayErrorContext(&e)))?;
    out.insert("role".into(), json!(role));
    let credentials = ImdsCredentialsProvider::builder()
        .imds_client(client.clone())
        .build()
        .provide_credentials()
        .await
        .map_err(no_credentials)?;
    describe(&credentials, out);
    let region = ImdsRegionProvider::builder()
        .imds_client(client)
        .build()
        .region()
        .await
        .map(|r| r.to_string());
    out.insert("region".into(), json!(region));

    for _ in 0..args.repeat {
        let token = token.as_deref().unwrap_or_default();
        let (status, _) = raw(
            &authority,
            "GET",
            &format!("/latest/meta-data/iam/security-credentials/{role}"),
            &[("x-aws-ec2-metadata-token", token)],
        )
        .await?;
        if status != 200 {
            return Err(format!("repeated credentials GET answered {status}"));
        }
    }

    if args.sts {
        check_with_sts(credentials, region, out).await?;
    }
    Ok(())
}

/// The container-credentials protocol, through the Rust SDK's own provider.
async fn probe_container(
    args: &ProbeArgs,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), String> {
    out.insert("source".into(), json!("container"));
    let credentials = aws_config::ecs::EcsCredentialsProvider::builder()
        .build()
        .provide_credentials()
        .await
        .map_err(no_credentials)?;
    describe(&credentials, out);
    if args.sts {
        check_with_sts(credentials, None, out).await?;
    }
    Ok(())
}

fn no_credentials(e: aws_credential_types::provider::error::CredentialsError) -> String {
    format!(
        "no credentials: {}",
        aws_sdk_sts::error::DisplayErrorContext(&e)
    )
}

/// The key's last four characters and the expiry: enough to compare, nothing secret.
fn describe(
    credentials: &aws_credential_types::Credentials,
    out: &mut serde_json::Map<String, Value>,
) {
    let key = credentials.access_key_id();
    out.insert(
        "access_key_id".into(),
        json!(format!("…{}", &key[key.len().saturating_sub(4)..])),
    );
    if let Some(exp) = credentials.expiry() {
        out.insert(
            "expiration".into(),
            json!(crate::clock::format_iso8601(exp)),
        );
    }
}

/// Asks STS whose credentials these are.
async fn check_with_sts(
    credentials: aws_credential_types::Credentials,
    region: Option<String>,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), String> {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .credentials_provider(credentials)
        .region(aws_config::Region::new(
            region.unwrap_or_else(|| "us-east-1".into()),
        ))
        .load()
        .await;
    let identity = aws_sdk_sts::Client::new(&config)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| {
            format!(
                "GetCallerIdentity failed: {}",
                aws_sdk_sts::error::DisplayErrorContext(&e)
            )
        })?;
    out.insert("caller_arn".into(), json!(identity.arn()));
    Ok(())
}

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
async fn raw(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| format!("connecting to {authority} timed out"))?
    .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut bytes))
        .await
        .map_err(|_| "reading the response timed out".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unparseable response: {head:?}"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Parsed, parse};

    fn probe_args(args: &[&str]) -> Result<ProbeArgs, String> {
        let mut all = vec!["imdsd", "probe"];
        all.extend_from_slice(args);
        match parse(all, &|_| None) {
            Ok(Parsed::Probe(p)) => Ok(p),
            Ok(other) => panic!("not a probe: {other:?}"),
            Err(e) => Err(e.problems.join("\n")),
        }
    }

    #[test]
    fn rounds_take_human_durations_and_for_needs_every() {
        let p = probe_args(&["--every", "3s", "--for", "10m"]).expect("valid");
        assert_eq!(p.every, Some(Duration::from_secs(3)));
        assert_eq!(p.run_for, Some(Duration::from_secs(600)));
        assert_eq!(probe_args(&[]).expect("valid").every, None);

        let e = probe_args(&["--for", "10m"]).expect_err("--for alone");
        assert!(e.contains("--every"), "{e}");
        let e = probe_args(&["--every", "0s"]).expect_err("zero");
        assert!(e.contains("longer than zero"), "{e}");
        let e = probe_args(&["--every", "soon"]).expect_err("not a duration");
        assert!(e.contains("e.g. 3s"), "{e}");
        // One-shot options make no sense per round.
        for other in [&["--hold", "5"][..], &["--repeat", "2"], &["--container"]] {
            let mut args = vec!["--every", "1s"];
            args.extend_from_slice(other);
            let e = probe_args(&args).expect_err("conflict");
            assert!(e.contains("cannot be used with"), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_recorder_reports_statuses_and_when_each_server_error_came() {
        let recorder = Recorder::default();
        {
            let mut seen = recorder.seen();
            *seen.statuses.entry(200).or_default() += 3;
            *seen.statuses.entry(503).or_default() += 1;
            seen.server_errors_at_ms.push(1_700_000_000_000);
        }
        let mut out = serde_json::Map::new();
        recorder.report(&mut out);
        assert_eq!(
            Value::Object(out),
            json!({"http": {"200": 3, "503": 1}, "http_5xx_at_ms": [1_700_000_000_000u64]})
        );
        // Nothing met, nothing to say beyond an empty count.
        let mut out = serde_json::Map::new();
        Recorder::default().report(&mut out);
        assert_eq!(Value::Object(out), json!({"http": {}}));
    }
}
