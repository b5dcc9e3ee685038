//! Where the cluster's signing keys come from: the Kubernetes API server's
//! `/openid/v1/jwks`, after `/version` says the server is one that serves them to the agent
//! (Kubernetes 1.34 or later, as the original agent decides).
//!
//! [`KeySource`] is the seam: unit tests pass a source of their own.

use futures::future::BoxFuture;

/// The first Kubernetes minor version (of major 1) whose keys the agent fetches, as upstream.
pub const MIN_MINOR: u32 = 34;

/// Why no key set could be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("GET /version")]
    Version(#[source] kube::Error),
    #[error("the API server's version is not readable: {0}")]
    VersionUnreadable(String),
    #[error("the API server is Kubernetes {major}.{minor}: keys are fetched from 1.{MIN_MINOR} on")]
    Unsupported { major: String, minor: String },
    #[error("GET /openid/v1/jwks")]
    Jwks(#[source] kube::Error),
    #[error("no answer within the deadline")]
    Timeout,
}

/// A source of JSON Web Key Sets.
pub trait KeySource: Send + Sync + 'static {
    /// The current key set, as JSON.
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, SourceError>>;
}

/// The Kubernetes API server, through the agent's client.
pub struct ApiServer {
    client: kube::Client,
}

impl ApiServer {
    pub fn new(client: kube::Client) -> Self {
        ApiServer { client }
    }

    async fn fetch_keys(&self) -> Result<Vec<u8>, SourceError> {
        let version = self
            .client
            .request_text(get("/version"))
            .await
            .map_err(SourceError::Version)?;
        check_version(&version)?;
        self.client
            .request_text(get("/openid/v1/jwks"))
            .await
            .map(String::into_bytes)
            .map_err(SourceError::Jwks)
    }
}

impl KeySource for ApiServer {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(self.fetch_keys())
    }
}

/// A GET of one of the API server's fixed paths (the method is `GET` by default).
fn get(path: &'static str) -> http::Request<Vec<u8>> {
    let mut request = http::Request::new(Vec::new());
    *request.uri_mut() = http::Uri::from_static(path);
    request
}

/// `/version`'s `major` and `minor` (EKS writes `"34+"`): 1.34 or later.
fn check_version(json: &str) -> Result<(), SourceError> {
    #[derive(serde::Deserialize)]
    struct Info {
        major: String,
        minor: String,
    }
    let info: Info =
        serde_json::from_str(json).map_err(|e| SourceError::VersionUnreadable(e.to_string()))?;
    let number = |s: &str| -> Option<u32> {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    match (number(&info.major), number(&info.minor)) {
        (Some(major), Some(minor)) if major > 1 || (major == 1 && minor >= MIN_MINOR) => Ok(()),
        (Some(_), Some(_)) => Err(SourceError::Unsupported {
            major: info.major,
            minor: info.minor,
        }),
        _ => Err(SourceError::VersionUnreadable(format!(
            "major {:?}, minor {:?}",
            info.major, info.minor
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_1_34_on_are_supported() {
        for ok in [
            r#"{"major":"1","minor":"34"}"#,
            r#"{"major":"1","minor":"34+","gitVersion":"v1.34.1-eks-1"}"#,
            r#"{"major":"1","minor":"36"}"#,
            r#"{"major":"2","minor":"0"}"#,
        ] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        assert!(matches!(
            check_version(r#"{"major":"1","minor":"33+"}"#),
            Err(SourceError::Unsupported { .. })
        ));
        for bad in [r#"{"major":"","minor":""}"#, "not json", r#"{"major":"1"}"#] {
            assert!(
                matches!(check_version(bad), Err(SourceError::VersionUnreadable(_))),
                "{bad}"
            );
        }
    }
}
