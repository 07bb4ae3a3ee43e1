//! A credential source wrapper that times every call for the metrics and remembers whether the
//! last call showed the daemon's own identity to be usable, for `/readyz`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::{AssumeRequest, CredentialSource, Credentials, SourceError};
use crate::metrics::Metrics;

/// STS error codes that say the daemon's own credentials are bad, not the role's.
const IDENTITY_ERRORS: &[&str] = &[
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
];

/// Wraps a source; cheap to share.
#[derive(Debug)]
pub struct ObservedSource {
    inner: Arc<dyn CredentialSource>,
    metrics: Arc<Metrics>,
    /// Why the source is unhealthy, from its last call; `None` when it worked (or was not used).
    problem: Arc<Mutex<Option<String>>>,
}

/// A handle to read the source's health from elsewhere (the admin API).
#[derive(Debug, Clone)]
pub struct SourceHealth(Arc<Mutex<Option<String>>>);

impl SourceHealth {
    /// `None` when the last call to the source showed it usable.
    pub fn problem(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ObservedSource {
    pub fn new(inner: Arc<dyn CredentialSource>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            metrics,
            problem: Arc::new(Mutex::new(None)),
        }
    }

    pub fn health(&self) -> SourceHealth {
        SourceHealth(self.problem.clone())
    }

    fn record(&self, outcome: &Result<Credentials, SourceError>, elapsed: Duration) {
        self.metrics.source_call(elapsed);
        let problem = match outcome {
            Ok(_) => None,
            Err(SourceError::Unavailable(m)) => Some(format!("STS is unavailable: {m}")),
            Err(SourceError::Denied { code, message })
                if IDENTITY_ERRORS.contains(&code.as_str()) =>
            {
                Some(format!(
                    "imdsd's own AWS identity is not usable: {code}: {message}"
                ))
            }
            // A refusal for one role says nothing about the source.
            Err(SourceError::Denied { .. }) => return,
        };
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }
}

impl CredentialSource for ObservedSource {
    fn assume<'a>(
        &'a self,
        request: &'a AssumeRequest,
    ) -> BoxFuture<'a, Result<Credentials, SourceError>> {
        Box::pin(async move {
            let started = Instant::now();
            let outcome = self.inner.assume(request).await;
            self.record(&outcome, started.elapsed());
            outcome
        })
    }

    fn default_duration(&self) -> Duration {
        self.inner.default_duration()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}
