//! The STS credential source: `sts:AssumeRole` from the operator's own AWS identity, through the
//! official Rust SDK. The only module that uses `aws-config` and `aws-sdk-sts`.
//!
//! The operator's identity comes from the SDK's usual sources, in the usual order: environment
//! keys, the shared config and credentials files (profiles, `source_profile` chains, SSO,
//! `credential_process`, web identity in a profile), a web identity token from the environment, the
//! container credentials endpoint, and, only when asked (`--source-imds`), the instance metadata
//! service. The last is off by default because the daemon usually *is* the metadata service on its
//! host, and asking itself would go round in circles.
//!
//! Errors are classified for the broker: a refusal that retrying will not fix (AccessDenied, a role
//! that does not exist, a bad external id or policy) is [`SourceError::Denied`]; throttling, 5xx,
//! timeouts and unreachable endpoints are [`SourceError::Unavailable`].

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::ecs::EcsCredentialsProvider;
use aws_config::environment::credentials::EnvironmentVariableCredentialsProvider;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::profile::{ProfileFileCredentialsProvider, ProfileFileRegionProvider};
use aws_config::provider_config::ProviderConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::{ProvideCredentials as _, error::CredentialsError};
use aws_sdk_sts::config::Region;
use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata as _, SdkError};
use aws_sdk_sts::types::{PolicyDescriptorType, Tag};
use futures::FutureExt as _;
use futures::future::BoxFuture;

use super::{AssumeRequest, CredentialSource, Credentials, Secret, SourceError};

/// STS's default session length, and the cap for role-chained sessions.
pub const ONE_HOUR: u32 = 3600;

/// How to reach STS and as whom.
#[derive(Debug, Clone, Default)]
pub struct StsOptions {
    /// `--profile` / `AWS_PROFILE`: the shared-config profile of the daemon's own identity.
    pub profile: Option<String>,
    /// The region of the STS endpoint (regional endpoints are used).
    pub region: Option<String>,
    /// Region to use when neither `region` nor the profile names one.
    pub fallback_region: String,
    /// `AWS_ENDPOINT_URL_STS`-style override, e.g. a LocalStack or moto server.
    pub endpoint: Option<String>,
    /// `DurationSeconds` for sessions that do not ask for their own.
    pub duration_seconds: u32,
    /// Include the instance metadata service in the daemon's own credential chain.
    pub use_imds: bool,
    /// Where that metadata service is (proxy mode: the upstream); `None` is the SDK's default.
    pub imds_endpoint: Option<String>,
}

/// Who the daemon is, according to `sts:GetCallerIdentity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    pub account: String,
    pub arn: String,
    pub partition: String,
    /// The daemon's own credentials are a role session, so sessions it creates are role chains
    /// (limited to one hour).
    pub is_role_session: bool,
}

/// Why the daemon cannot use STS; the message says what was tried and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum StsSetupError {
    /// The operator must fix their identity or configuration.
    #[error("{0}")]
    Identity(String),
    /// STS could not be reached; worth retrying later.
    #[error("{0}")]
    Unreachable(String),
}

/// Assumes roles with STS.
#[derive(Debug)]
pub struct StsSource {
    client: aws_sdk_sts::Client,
    identity: SourceIdentity,
    duration_seconds: u32,
}

impl StsSource {
    /// Resolves the daemon's own identity and checks it with `GetCallerIdentity`.
    pub async fn connect(options: &StsOptions) -> Result<Self, StsSetupError> {
        let region = match &options.region {
            Some(r) => r.clone(),
            None => {
                let mut profile_region = ProfileFileRegionProvider::builder();
                if let Some(p) = &options.profile {
                    profile_region = profile_region.profile_name(p);
                }
                match aws_config::meta::region::ProvideRegion::region(&profile_region.build()).await
                {
                    Some(r) => r.to_string(),
                    None => options.fallback_region.clone(),
                }
            }
        };
        let region = Region::new(region);
        let conf = ProviderConfig::default().with_region(Some(region.clone()));

        let mut profile = ProfileFileCredentialsProvider::builder().configure(&conf);
        if let Some(p) = &options.profile {
            profile = profile.profile_name(p);
        }
        let mut chain = CredentialsProviderChain::first_try(
            "Environment",
            EnvironmentVariableCredentialsProvider::new(),
        )
        .or_else("Profile", profile.build())
        .or_else(
            "WebIdentityToken",
            aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder()
                .configure(&conf)
                .build(),
        )
        .or_else(
            "EcsContainer",
            EcsCredentialsProvider::builder().configure(&conf).build(),
        );
        if options.use_imds {
            let mut imds = ImdsCredentialsProvider::builder().configure(&conf);
            if let Some(endpoint) = &options.imds_endpoint {
                let client = aws_config::imds::Client::builder()
                    .configure(&conf)
                    .endpoint(endpoint.as_str())
                    .map_err(|e| {
                        StsSetupError::Identity(format!(
                            "the metadata service endpoint {endpoint:?} is not usable: {e}"
                        ))
                    })?
                    .build();
                imds = imds.imds_client(client);
            }
            chain = chain.or_else("Ec2InstanceMetadata", imds.build());
        }

        // Ask the chain directly first: its error says which source failed and why, which a
        // failed STS call would bury.
        if let Err(e) = chain.provide_credentials().await {
            return Err(StsSetupError::Identity(describe_missing_identity(
                &e, options,
            )));
        }

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(chain)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(15))
                    .build(),
            );
        if let Some(p) = &options.profile {
            loader = loader.profile_name(p);
        }
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let sdk_config = loader.load().await;
        let client = aws_sdk_sts::Client::new(&sdk_config);

        let identity = client.get_caller_identity().send().await.map_err(|e| {
            let detail = DisplayErrorContext(&e).to_string();
            match &e {
                SdkError::ServiceError(se) => StsSetupError::Identity(format!(
                    "STS refused the daemon's own credentials ({}: {}); refresh them (e.g. `aws sso \
                     login{}`) or choose another profile with --profile",
                    se.err().code().unwrap_or("error"),
                    se.err().message().unwrap_or(&detail),
                    options.profile.as_ref().map(|p| format!(" --profile {p}")).unwrap_or_default(),
                )),
                _ => StsSetupError::Unreachable(format!(
                    "cannot reach STS in {region}{}: {detail}",
                    options
                        .endpoint
                        .as_ref()
                        .map(|e| format!(" at {e}"))
                        .unwrap_or_default()
                )),
            }
        })?;
        let arn = identity.arn().unwrap_or_default().to_string();
        let account = identity.account().unwrap_or_default().to_string();
        let partition = arn.split(':').nth(1).unwrap_or("aws").to_string();
        let is_role_session = arn.contains(":assumed-role/");
        let duration_seconds = if is_role_session && options.duration_seconds > ONE_HOUR {
            tracing::warn!(
                requested = options.duration_seconds,
                "the daemon's own identity is a role session, so the roles it assumes are role \
                 chains, which STS limits to one hour; using 3600 seconds"
            );
            ONE_HOUR
        } else {
            options.duration_seconds
        };
        tracing::info!(identity = %arn, account = %account, region = %region, "source identity verified");
        Ok(Self {
            client,
            identity: SourceIdentity {
                account,
                arn,
                partition,
                is_role_session,
            },
            duration_seconds,
        })
    }

    pub fn identity(&self) -> &SourceIdentity {
        &self.identity
    }
}

impl CredentialSource for StsSource {
    fn assume<'a>(
        &'a self,
        request: &'a AssumeRequest,
    ) -> BoxFuture<'a, Result<Credentials, SourceError>> {
        async move {
            let mut duration = request.duration_seconds.unwrap_or(self.duration_seconds);
            if self.identity.is_role_session {
                duration = duration.min(ONE_HOUR);
            }
            let mut call = self
                .client
                .assume_role()
                .role_arn(request.role_arn.as_str())
                .role_session_name(&request.session_name)
                .duration_seconds(i32::try_from(duration).unwrap_or(i32::MAX))
                .set_external_id(request.external_id.clone())
                .set_policy(request.policy.clone())
                .set_source_identity(request.source_identity.clone());
            for arn in &request.policy_arns {
                call = call.policy_arns(PolicyDescriptorType::builder().arn(arn).build());
            }
            for (key, value) in &request.tags {
                let tag = Tag::builder().key(key).value(value).build().map_err(|e| {
                    SourceError::Denied {
                        code: "InvalidParameterValue".into(),
                        message: format!("session tag {key:?}: {e}"),
                    }
                })?;
                call = call.tags(tag);
            }
            for key in &request.transitive_tag_keys {
                call = call.transitive_tag_keys(key);
            }
            let output = call.send().await.map_err(|e| classify(&e, request))?;
            let creds = output.credentials().ok_or_else(|| {
                SourceError::Unavailable(format!(
                    "STS returned no credentials for {}",
                    request.role_arn
                ))
            })?;
            let expiration = SystemTime::try_from(*creds.expiration()).map_err(|e| {
                SourceError::Unavailable(format!("STS returned an unusable expiration: {e}"))
            })?;
            let credentials = Credentials {
                access_key_id: creds.access_key_id().to_string(),
                secret_access_key: Secret::new(creds.secret_access_key()),
                session_token: Secret::new(creds.session_token()),
                expiration,
                assumed_role_arn: output.assumed_role_user().map(|u| u.arn().to_string()),
            };
            // The SDK fills the required fields of a cut-off or malformed answer with empty
            // strings and the Unix epoch rather than failing: that is a failed call.
            match credentials.unusable(SystemTime::now()) {
                None => Ok(credentials),
                Some(why) => Err(SourceError::Unavailable(format!(
                    "STS answered AssumeRole for {} without usable credentials ({why})",
                    request.role_arn
                ))),
            }
        }
        .boxed()
    }

    fn default_duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.duration_seconds))
    }

    fn kind(&self) -> &'static str {
        "sts"
    }
}

/// Splits STS failures into "retry later" and "this will not work". Only an error STS itself
/// states (a 4xx with an error code) is a refusal: a 5xx or 429, or an answer with no error code
/// that can be read (an HTML page from a proxy, a cut-off or garbled body), is a failure to reach
/// STS and worth retrying.
fn classify<E>(error: &SdkError<E, HttpResponse>, request: &AssumeRequest) -> SourceError
where
    E: aws_sdk_sts::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let role = &request.role_arn;
    match error {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let Some(code) = se.err().code() else {
                // Never the SDK's full error context here: it shows the raw answer, and a
                // garbled 200 may hold a secret key.
                let what = if status < 400 {
                    "an answer that is not an AssumeRole response".to_string()
                } else {
                    format!("an error that is not STS's ({})", chain(se.err()))
                };
                return SourceError::Unavailable(format!(
                    "STS answered HTTP {status} with {what} for {role}"
                ));
            };
            let message = se.err().message().unwrap_or("no message");
            if is_transient(code) || status >= 500 || status == 429 {
                SourceError::Unavailable(format!(
                    "STS answered {code} (HTTP {status}) for {role}: {message}"
                ))
            } else {
                SourceError::Denied {
                    // EC2 reports a role it may not assume with this code; SDKs print it.
                    code: if code == "AccessDenied" {
                        "AssumeRoleUnauthorizedAccess".into()
                    } else {
                        code.to_string()
                    },
                    message: format!(
                        "cannot assume {role} (session {}): {code}: {message}",
                        request.session_name
                    ),
                }
            }
        }
        SdkError::TimeoutError(_) => {
            SourceError::Unavailable(format!("STS timed out assuming {role}"))
        }
        SdkError::ResponseError(e) => SourceError::Unavailable(format!(
            "STS answered HTTP {} with something that could not be read for {role}",
            e.raw().status().as_u16()
        )),
        SdkError::DispatchFailure(e) => SourceError::Unavailable(format!(
            "cannot reach STS to assume {role}: {}",
            e.as_connector_error()
                .map_or_else(|| "dispatch failure".to_string(), |c| chain(c))
        )),
        other => SourceError::Unavailable(format!(
            "cannot assume {role}: {}",
            DisplayErrorContext(other)
        )),
    }
}

/// An error and its sources, as `a: b: c`, without any `Debug` output.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

fn is_transient(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "InternalFailure"
            | "InternalError"
            | "InternalServerError"
            | "IDPCommunicationError"
            | "RequestTimeout"
            | "RequestTimeoutException"
    )
}

fn describe_missing_identity(error: &CredentialsError, options: &StsOptions) -> String {
    let profile = options
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    let mut tried = vec![
        "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)".to_string(),
        format!(
            "profile {profile:?} in the shared config and credentials files (~/.aws/config, ~/.aws/credentials)"
        ),
        "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN)".to_string(),
        "the container credentials endpoint (AWS_CONTAINER_CREDENTIALS_*)".to_string(),
    ];
    if options.use_imds {
        tried.push("the instance metadata service".into());
    }
    format!(
        "no usable AWS identity for the daemon to assume roles with ({}). Tried: {}. Fix: run `aws \
         configure --profile NAME` (or `aws sso login --profile NAME`) and start imdsd with --profile \
         NAME; on EC2 add --source-imds to use the instance profile; or run with --fake-credentials \
         to serve offline credentials",
        DisplayErrorContext(error),
        tried.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use aws_sdk_sts::operation::assume_role::AssumeRoleError;

    use super::*;

    #[test]
    fn throttling_and_outages_are_transient_refusals_are_not() {
        for code in [
            "Throttling",
            "ServiceUnavailable",
            "InternalFailure",
            "IDPCommunicationError",
        ] {
            assert!(is_transient(code), "{code}");
        }
        for code in [
            "AccessDenied",
            "MalformedPolicyDocument",
            "ValidationError",
            "RegionDisabledException",
        ] {
            assert!(!is_transient(code), "{code}");
        }
    }

    fn answered(status: u16, code: Option<&str>) -> SdkError<AssumeRoleError, HttpResponse> {
        let mut meta = aws_smithy_types::error::ErrorMetadata::builder();
        if let Some(code) = code {
            meta = meta.code(code).message("scripted");
        }
        let raw = HttpResponse::new(
            status.try_into().expect("status"),
            aws_smithy_types::body::SdkBody::from("<Secret>wJalrXUtnFEMI</Secret>"),
        );
        SdkError::service_error(AssumeRoleError::generic(meta.build()), raw)
    }

    #[test]
    fn only_an_error_sts_states_is_a_refusal() {
        let request = AssumeRequest::new(
            crate::identity::role::RoleArn::parse("arn:aws:iam::123456789012:role/app")
                .expect("arn"),
            "s",
        );
        for (status, code) in [(400, "AccessDenied"), (400, "ValidationError")] {
            let e = classify(&answered(status, Some(code)), &request);
            assert!(e.is_permanent(), "{status} {code}: {e}");
        }
        for (status, code) in [
            (400, Some("Throttling")),
            (500, Some("SomethingNew")),
            (503, None),
            (429, Some("SlowDown")),
            (502, None),
            (200, None),
            (403, None),
        ] {
            let e = classify(&answered(status, code), &request);
            assert!(!e.is_permanent(), "{status} {code:?}: {e}");
            assert!(e.to_string().contains(&format!("HTTP {status}")), "{e}");
            assert!(
                !e.to_string().contains("wJalr"),
                "the raw answer is not shown: {e}"
            );
        }
    }
}
