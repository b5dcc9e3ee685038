//! The EKS Auth client: `AssumeRoleForPodIdentity` through `aws-sdk-eksauth`.
//!
//! The agent's own AWS credentials and region come from `aws-config`'s default chain. Timeouts
//! and retries are short, so that a pod's SDK (1–2 s client timeouts) gets an answer, even an
//! error, before it gives up.

use std::time::SystemTime;

use aws_config::BehaviorVersion;
use aws_config::identity::IdentityCache;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::provider::{self, ProvideCredentials};
use aws_sdk_eksauth::config::http::HttpResponse;
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
        let sdk_config = loader.load().await;
        if sdk_config.region().is_none() {
            return Err(EksAuthSetupError::NoRegion);
        }
        Ok(EksAuth {
            client: aws_sdk_eksauth::Client::new(&sdk_config),
            cluster_name,
        })
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
    let expiration = SystemTime::try_from(*creds.expiration())
        .map_err(|_| missing("usable credentials.expiration"))?;
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

    #[test]
    fn arns() {
        let arn = "arn:aws:sts::111122223333:assumed-role/cart-role/eks-prod-cart-7d9-abc";
        assert_eq!(account_id(arn), "111122223333");
        assert_eq!(role_arn(arn), "arn:aws:iam::111122223333:role/cart-role");
        assert_eq!(role_arn("nonsense"), "");
        assert_eq!(account_id("nonsense"), "");
    }
}
