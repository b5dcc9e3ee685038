//! The EKS Auth client: `AssumeRoleForPodIdentity` through `aws-sdk-eksauth`.
//!
//! The agent's own AWS credentials and region come from `aws-config`'s default chain. Timeouts
//! are the original agent's by default (see [`UpstreamConfig`]); a pod's request never waits for
//! all of them (the cache answers it within its wait deadline, and the call runs on, so that the
//! SDK's retry is a hit). Throttled calls are not retried here: the admission path
//! ([`super::admission`]) paces and retries them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::BehaviorVersion;
use aws_config::identity::IdentityCache;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::{self, ProvideCredentials};
use aws_sdk_eksauth::config::http::HttpResponse;
use aws_sdk_eksauth::config::interceptors::InterceptorContext;
use aws_sdk_eksauth::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_eksauth::error::{ProvideErrorMetadata as _, SdkError};
use aws_sdk_eksauth::operation::assume_role_for_pod_identity::{
    AssumeRoleForPodIdentityError, AssumeRoleForPodIdentityOutput,
};

use super::{Association, Credentials, Issued, Retriever, UpstreamError};
use crate::config::UpstreamConfig;

/// Why the EKS Auth client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EksAuthSetupError {
    #[error(
        "no AWS region for EKS Auth: set AWS_REGION (or run where the instance metadata service answers)"
    )]
    NoRegion,
}

/// `AssumeRoleForPodIdentity` for one cluster.
#[derive(Debug, Clone)]
pub struct EksAuth {
    client: aws_sdk_eksauth::Client,
    cluster_name: String,
}

impl EksAuth {
    /// Loads the agent's own AWS configuration and builds the client.
    pub async fn new(
        cluster_name: String,
        cfg: &UpstreamConfig,
    ) -> Result<Self, EksAuthSetupError> {
        let sdk_config = Self::loader(cfg).load().await;
        if sdk_config.region().is_none() {
            return Err(EksAuthSetupError::NoRegion);
        }
        Ok(Self::from_sdk_config(&sdk_config, cluster_name))
    }

    /// `aws-config`'s default chain with the agent's timeouts, retries, endpoint and credentials
    /// choice: what [`Self::new`] loads (tests add a region and credentials of their own).
    pub fn loader(cfg: &UpstreamConfig) -> aws_config::ConfigLoader {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(cfg.connect_timeout)
            .operation_attempt_timeout(cfg.attempt_timeout)
            .operation_timeout(cfg.call_timeout)
            .build();
        let retries = RetryConfig::standard()
            .with_max_attempts(cfg.max_attempts)
            .with_initial_backoff(std::time::Duration::from_millis(50))
            .with_max_backoff(std::time::Duration::from_millis(200));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(retries);
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if cfg.rotate_credentials {
            // No identity cache: every signing asks the provider, which re-reads the file.
            loader = loader
                .credentials_provider(RereadSharedCredentials)
                .identity_cache(IdentityCache::no_cache());
        }
        loader
    }

    /// The client on a loaded configuration. Throttled calls are not retried by the SDK: the
    /// admission path paces and retries them.
    pub fn from_sdk_config(sdk_config: &aws_config::SdkConfig, cluster_name: String) -> Self {
        let client_config = aws_sdk_eksauth::config::Builder::from(sdk_config)
            .retry_classifier(NoRetryOnThrottling)
            .build();
        EksAuth {
            client: aws_sdk_eksauth::Client::from_conf(client_config),
            cluster_name,
        }
    }

    /// A client configured elsewhere: the fuzz targets give it a stand-in HTTP client.
    #[doc(hidden)]
    pub fn from_client(client: aws_sdk_eksauth::Client, cluster_name: String) -> Self {
        EksAuth {
            client,
            cluster_name,
        }
    }
}

impl Retriever for EksAuth {
    async fn fetch(&self, token: &str) -> Result<Issued, UpstreamError> {
        let output = self
            .client
            .assume_role_for_pod_identity()
            .cluster_name(&self.cluster_name)
            .token(token)
            .send()
            .await
            .map_err(upstream_error)?;
        issued_from(&output)
    }
}

/// Forbids the SDK's own retry of a throttled call: within one agent call it would send more
/// calls to a service that asked for fewer. The admission path retries them at its pace.
#[derive(Debug)]
struct NoRetryOnThrottling;

impl ClassifyRetry for NoRetryOnThrottling {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let status_429 = ctx.response().is_some_and(|r| r.status().as_u16() == 429);
        let throttling_code = matches!(ctx.output_or_error(), Some(Err(e)) if e
            .as_operation_error()
            .and_then(|e| e.downcast_ref::<AssumeRoleForPodIdentityError>())
            .and_then(|e| e.code())
            .is_some_and(super::upstream_error::is_throttling_code));
        if status_429 || throttling_code {
            RetryAction::RetryForbidden
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "NoRetryOnThrottling"
    }
}

/// Maps the SDK's error to the status and code the agent answers with.
fn upstream_error(err: SdkError<AssumeRoleForPodIdentityError, HttpResponse>) -> UpstreamError {
    match &err {
        SdkError::ServiceError(ctx) => {
            let e = ctx.err();
            UpstreamError::new(
                ctx.raw().status().as_u16(),
                e.code().unwrap_or("UnknownError"),
                e.message().unwrap_or("EKS Auth returned an error"),
            )
        }
        SdkError::TimeoutError(_) => {
            UpstreamError::new(504, "Timeout", "EKS Auth did not answer in time")
        }
        SdkError::DispatchFailure(_) => UpstreamError::new(
            503,
            "Unreachable",
            format!(
                "EKS Auth could not be reached: {}",
                crate::error_chain(&err)
            ),
        ),
        SdkError::ResponseError(_) => {
            UpstreamError::new(502, "BadResponse", "EKS Auth's answer was not readable")
        }
        SdkError::ConstructionFailure(_) => UpstreamError::new(
            500,
            "RequestNotSigned",
            format!(
                "the request to EKS Auth could not be built: {}",
                crate::error_chain(&err)
            ),
        ),
        _ => UpstreamError::new(500, err.code().unwrap_or("UnknownError"), err.to_string()),
    }
}

/// The last instant RFC 3339 writes, 9999-12-31T23:59:59Z.
const LATEST_EXPIRATION: Duration = Duration::from_secs(253_402_300_799);

/// The answer, checked: all members present, expiration representable.
fn issued_from(out: &AssumeRoleForPodIdentityOutput) -> Result<Issued, UpstreamError> {
    let missing = |what: &str| {
        UpstreamError::new(
            502,
            "BadResponse",
            format!("EKS Auth's answer has no {what}"),
        )
    };
    let creds = out.credentials().ok_or_else(|| missing("credentials"))?;
    let user = out
        .assumed_role_user()
        .ok_or_else(|| missing("assumedRoleUser"))?;
    // The SDK reads a member missing from the answer as empty, a missing time as the epoch:
    // refused, rather than handing pods credentials that cannot work. The expiration must also
    // be one RFC 3339 can write (the pods' SDKs read it so).
    if creds.access_key_id().is_empty()
        || creds.secret_access_key().is_empty()
        || creds.session_token().is_empty()
    {
        return Err(missing("credentials keys"));
    }
    let expiration = SystemTime::try_from(*creds.expiration())
        .ok()
        .filter(|t| {
            t.duration_since(UNIX_EPOCH)
                .is_ok_and(|d| !d.is_zero() && d <= LATEST_EXPIRATION)
        })
        .ok_or_else(|| missing("usable credentials.expiration"))?;
    let subject = out.subject();
    let association = out.pod_identity_association();
    Ok(Issued::new(
        Credentials {
            access_key_id: creds.access_key_id().to_owned(),
            secret_access_key: creds.secret_access_key().to_owned(),
            session_token: creds.session_token().to_owned(),
            account_id: account_id(user.arn()).to_owned(),
            expiration,
        },
        Association {
            namespace: subject
                .map(|s| s.namespace().to_owned())
                .unwrap_or_default(),
            service_account: subject
                .map(|s| s.service_account().to_owned())
                .unwrap_or_default(),
            role_arn: role_arn(user.arn()),
            assumed_role_arn: user.arn().to_owned(),
            association_id: association
                .map(|a| a.association_id().to_owned())
                .unwrap_or_default(),
        },
    ))
}

/// `arn:aws:sts::111122223333:assumed-role/Role/session` → `111122223333`.
fn account_id(arn: &str) -> &str {
    arn.split(':').nth(4).unwrap_or_default()
}

/// `arn:aws:sts::111122223333:assumed-role/Role/session` → `arn:aws:iam::111122223333:role/Role`.
fn role_arn(assumed_role_arn: &str) -> String {
    let mut parts = assumed_role_arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some(_sts), Some(_region), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return String::new();
    };
    match resource
        .strip_prefix("assumed-role/")
        .and_then(|r| r.split('/').next())
    {
        Some(role) => format!("arn:{partition}:iam::{account}:role/{role}"),
        None => String::new(),
    }
}

/// The shared credentials file, read again on every call (`--rotate-credentials`): hybrid nodes
/// rotate the agent's own keys in place.
#[derive(Debug)]
struct RereadSharedCredentials;

impl ProvideCredentials for RereadSharedCredentials {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async {
            aws_config::profile::ProfileFileCredentialsProvider::builder()
                .build()
                .provide_credentials()
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer whose credentials have this access key id and expiration (epoch seconds).
    fn answer(access_key_id: &str, expiration: f64) -> AssumeRoleForPodIdentityOutput {
        use aws_sdk_eksauth::types::{AssumedRoleUser, Credentials as SdkCredentials};
        let credentials = SdkCredentials::builder()
            .access_key_id(access_key_id)
            .secret_access_key("secret")
            .session_token("session")
            .expiration(aws_smithy_types::DateTime::from_secs_f64(expiration))
            .build()
            .unwrap();
        let user = AssumedRoleUser::builder()
            .arn("arn:aws:sts::111122223333:assumed-role/cart-role/s")
            .assume_role_id("AROA:s")
            .build()
            .unwrap();
        AssumeRoleForPodIdentityOutput::builder()
            .audience("pods.eks.amazonaws.com")
            .credentials(credentials)
            .assumed_role_user(user)
            .build()
            .unwrap()
    }

    #[test]
    fn answers_the_body_cannot_carry_are_bad_responses() {
        // Found by the `upstream_reply` fuzz target: an expiration before 1970 or after 9999
        // panicked rendering the body; and the SDK reads missing keys as empty and a missing
        // expiration as the epoch, which were served as credentials.
        let ok = issued_from(&answer("ASIA1", 1_795_629_600.0)).unwrap();
        assert_eq!(ok.credentials.access_key_id, "ASIA1");
        for (key, expiration) in [
            ("ASIA1", -1.0),
            ("ASIA1", 0.0),
            ("ASIA1", 1e15),
            ("", 1_795_629_600.0),
        ] {
            let e = issued_from(&answer(key, expiration)).unwrap_err();
            assert_eq!(
                (e.status, e.code.as_str()),
                (502, "BadResponse"),
                "{key:?} {expiration}"
            );
        }
        assert!(issued_from(&answer("ASIA1", 253_402_300_799.0)).is_ok());
    }

    #[test]
    fn arns() {
        let arn = "arn:aws:sts::111122223333:assumed-role/cart-role/eks-prod-cart-7d9-abc";
        assert_eq!(account_id(arn), "111122223333");
        assert_eq!(role_arn(arn), "arn:aws:iam::111122223333:role/cart-role");
        assert_eq!(role_arn("nonsense"), "");
        assert_eq!(account_id("nonsense"), "");
    }
}
