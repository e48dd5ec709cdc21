//! What every client of the coordinator shares: the channel (with timeouts and
//! keep-alive) and the bearer token sent on every call.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Why a client of the coordinator cannot be set up: the variable or address
/// at fault, and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("DPO_TOKEN: not a valid header value")]
    BadToken,
    /// A `DPO_TLS_*` file that cannot be read or is not PEM.
    #[error("{var}={path}: {reason}")]
    Pem {
        var: &'static str,
        path: String,
        reason: String,
    },
    #[error("DPO_TLS_CERT and DPO_TLS_KEY go together")]
    HalfIdentity,
    /// The coordinator's address, and what is wrong with it.
    #[error("coordinator address {url}: {reason}")]
    Address { url: String, reason: String },
}

/// Adds `authorization: Bearer <token>` to every request (nothing without a token).
#[derive(Clone, Default)]
pub struct BearerToken {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("BearerToken")
            .field("set", &self.header.is_some())
            .finish()
    }
}

impl BearerToken {
    /// The token from `DPO_TOKEN`, if set.
    pub fn from_env() -> Result<Self, ClientError> {
        Self::new(std::env::var("DPO_TOKEN").ok().filter(|t| !t.is_empty()))
    }

    pub fn new(token: Option<String>) -> Result<Self, ClientError> {
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<_>>()
                    .map_err(|_| ClientError::BadToken)
            })
            .transpose()?;
        Ok(BearerToken { header })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// TLS settings of a client of the coordinator, from the environment:
/// `DPO_TLS_CA` (PEM bundle of the authority that signed the coordinator's
/// certificate; without it, `https://` addresses are checked against the
/// system's roots), `DPO_TLS_CERT` + `DPO_TLS_KEY` (a client certificate, for a
/// coordinator that requires one) and `DPO_TLS_DOMAIN` (the name to check the
/// certificate against when it differs from the address's host).
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<Certificate>,
    identity: Option<Identity>,
    domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

fn read_pem(var: &'static str, path: &str) -> Result<Vec<u8>, ClientError> {
    let failed = |reason: String| ClientError::Pem {
        var,
        path: path.to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(failed("not a PEM file".into()));
    }
    Ok(bytes)
}

impl ClientTls {
    pub fn from_env() -> Result<Self, ClientError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::from_files(
            var("DPO_TLS_CA").as_deref(),
            var("DPO_TLS_CERT").as_deref(),
            var("DPO_TLS_KEY").as_deref(),
            var("DPO_TLS_DOMAIN"),
        )
    }

    pub fn from_files(
        ca: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
        domain: Option<String>,
    ) -> Result<Self, ClientError> {
        let ca = ca
            .map(|p| read_pem("DPO_TLS_CA", p).map(Certificate::from_pem))
            .transpose()?;
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some(Identity::from_pem(
                read_pem("DPO_TLS_CERT", c)?,
                read_pem("DPO_TLS_KEY", k)?,
            )),
            (None, None) => None,
            _ => return Err(ClientError::HalfIdentity),
        };
        Ok(ClientTls {
            ca,
            identity,
            domain,
        })
    }

    /// Whether anything was configured (then a bare `host:port` means TLS).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.identity.is_some() || self.domain.is_some()
    }

    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new();
        match &self.ca {
            Some(ca) => c = c.ca_certificate(ca.clone()),
            None => c = c.with_native_roots(),
        }
        if let Some(id) = &self.identity {
            c = c.identity(id.clone());
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        c
    }
}

/// A lazily connecting channel to `url`: `https://host:port` (TLS),
/// `http://host:port` (plain), or a bare `host:port` (TLS when `tls` is set).
pub fn channel(url: &str, tls: &ClientTls) -> Result<Channel, ClientError> {
    let url = if url.contains("://") {
        url.to_string()
    } else if tls.is_set() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    let secure = url.starts_with("https://");
    if !secure && tls.is_set() {
        return Err(ClientError::Address {
            url,
            reason: "TLS is configured (DPO_TLS_*) but the address is not https://".into(),
        });
    }
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| ClientError::Address {
            url: format!("{url:?}"),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if secure {
        endpoint = endpoint
            .tls_config(tls.config())
            .map_err(|e| ClientError::Address {
                url: url.clone(),
                reason: format!("TLS: {e}"),
            })?;
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_set_up_errors_name_what_is_wrong() {
        assert_eq!(
            BearerToken::new(Some("two\nlines".into())).expect_err("header"),
            ClientError::BadToken
        );
        assert!(BearerToken::new(None).is_ok());
        assert_eq!(
            ClientTls::from_files(None, Some("/c.pem"), None, None).expect_err("half"),
            ClientError::HalfIdentity
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "hello").expect("write");
        let path = not_pem.display().to_string();
        match ClientTls::from_files(Some(&path), None, None, None).expect_err("not PEM") {
            ClientError::Pem { var, reason, .. } => {
                assert_eq!(var, "DPO_TLS_CA");
                assert_eq!(reason, "not a PEM file");
            }
            other => panic!("{other}"),
        }
        let tls = ClientTls {
            domain: Some("coordinator".into()),
            ..ClientTls::default()
        };
        let e = channel("http://127.0.0.1:1", &tls).expect_err("TLS on http");
        assert!(matches!(e, ClientError::Address { .. }), "{e}");
        assert!(e.to_string().contains("not https://"), "{e}");
    }
}
