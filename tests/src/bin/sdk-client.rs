//! Fetches credentials the way an application on the AWS SDK for Rust does: `aws-config`'s default chain,
//! which (with only `AWS_CONTAINER_CREDENTIALS_FULL_URI` and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` set)
//! ends up in the container credential provider.
//!
//! Prints one JSON line `{access_key_id, secret_access_key, session_token, account_id, expiry}` or exits 1
//! with the error on stderr.

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;
use aws_smithy_types::DateTime;
use aws_smithy_types::date_time::Format;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    match fetch().await {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(1);
        }
    }
}

async fn fetch() -> anyhow::Result<String> {
    let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
    let provider = config
        .credentials_provider()
        .ok_or_else(|| anyhow::anyhow!("the default chain has no credentials provider"))?;
    let creds = provider.provide_credentials().await.map_err(|e| {
        anyhow::anyhow!(
            "{}",
            aws_smithy_types::error::display::DisplayErrorContext(&e)
        )
    })?;
    let expiry = creds
        .expiry()
        .map(|t| DateTime::from(t).fmt(Format::DateTime))
        .transpose()?;
    let line = serde_json::json!({
        "access_key_id": creds.access_key_id(),
        "secret_access_key": creds.secret_access_key(),
        "session_token": creds.session_token(),
        "account_id": creds.account_id().map(|a| a.as_str()),
        "expiry": expiry,
    });
    Ok(line.to_string())
}
