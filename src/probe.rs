//! `imdsd probe`: asks a metadata service for credentials exactly as an AWS SDK does (the Rust
//! SDK's own IMDS client and providers), optionally checks them with `sts:GetCallerIdentity`, and
//! prints what it got as one JSON line. Run it inside a container to see what that container
//! receives; the end-to-end tests use it as their in-container client.
//!
//! It never prints a secret: access keys are shown by their last four characters.

use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::imds::region::ImdsRegionProvider;
use aws_credential_types::provider::ProvideCredentials as _;
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
}

/// Runs the probe; returns the process exit code (0 when credentials were obtained).
pub async fn run(args: ProbeArgs) -> u8 {
    let started = Instant::now();
    let endpoint = args
        .endpoint
        .clone()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "http://169.254.169.254".into());
    let mut out = serde_json::Map::new();
    out.insert("endpoint".into(), json!(endpoint));
    let deadline = Instant::now() + Duration::from_secs(args.retry_for);
    let mut outcome = probe(&args, &endpoint, &mut out).await;
    while outcome.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        out.retain(|k, _| k == "endpoint");
        outcome = probe(&args, &endpoint, &mut out).await;
    }
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

async fn probe(
    args: &ProbeArgs,
    endpoint: &str,
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
