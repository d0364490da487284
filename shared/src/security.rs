//! The security of a gRPC server, loaded once at start-up (README: Running securely): TLS and mTLS
//! (rustls through tonic's `tls-ring` feature), the authentication layer, whether
//! reflection is served. Every file is read here, so a bad one stops the server before it
//! serves anything rather than failing every handshake or request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use std::sync::Arc;

use crate::auth::{AuthError, AuthLayer, Authenticator};
use crate::config::{SecurityArgs, Switch};

/// How long a client may take over its TLS handshake before the connection is dropped
/// (handshakes run beside each other: a slow one delays no one else).
const HANDSHAKE_TIMEOUT_S: u64 = 10;

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct TlsError {
    path: PathBuf,
    source: std::io::Error,
}

/// Why the security configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
}

/// What a server needs to serve securely.
pub struct Security {
    /// `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// `None`: authentication off.
    pub auth: Option<Arc<Authenticator>>,
    /// Whether to serve reflection.
    pub reflection: bool,
}

impl Security {
    /// Loads every file `args` names, logs the transport (warning about plaintext
    /// beyond loopback) and starts the SIGHUP reload of the tokens file. Call inside the
    /// runtime.
    pub fn load(args: &SecurityArgs, listen: SocketAddr) -> Result<Security, SecurityError> {
        let tls = server_config(args)?;
        let auth = Authenticator::load(args.auth_tokens.as_deref(), args.auth_jwt_key.as_deref())?;
        if let Some(auth) = &auth {
            auth.reload_on_sighup();
        }
        log_transport(listen, args);
        Ok(Security {
            tls,
            auth,
            reflection: args.reflection == Switch::On,
        })
    }

    /// The authentication layer (passes everything when authentication is off).
    pub fn auth_layer(&self) -> AuthLayer {
        AuthLayer::new(self.auth.clone())
    }

    /// A server builder with TLS on when configured.
    pub fn server_builder(&self) -> Result<tonic::transport::Server, tonic::transport::Error> {
        let builder = tonic::transport::Server::builder();
        match &self.tls {
            Some(tls) => builder.tls_config(tls.clone()),
            None => Ok(builder),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        path: path.to_path_buf(),
        source,
    })
}

/// The server TLS configuration of `args`, or `None` when TLS is off.
pub fn server_config(args: &SecurityArgs) -> Result<Option<ServerTlsConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .timeout(Duration::from_secs(HANDSHAKE_TIMEOUT_S));
    if let Some(ca) = &args.tls_client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(config))
}

/// Whether the server would serve plaintext to other machines (worth a warning).
pub fn plaintext_beyond_loopback(listen: SocketAddr, args: &SecurityArgs) -> bool {
    args.tls_cert.is_none() && !listen.ip().is_loopback()
}

/// Says what the server's transport is, with a warning when plaintext goes beyond this
/// machine.
fn log_transport(listen: SocketAddr, args: &SecurityArgs) {
    let tls = args.tls_cert.is_some();
    let authenticated = args.auth_tokens.is_some() || args.auth_jwt_key.is_some();
    if plaintext_beyond_loopback(listen, args) {
        tracing::warn!(
            %listen,
            "serving plaintext gRPC on a non-loopback address: anyone on the network can read the traffic{}; see --tls-cert",
            if authenticated { " and the tokens in it" } else { "" }
        );
    }
    tracing::info!(
        %listen,
        tls = tls,
        mtls = args.tls_client_ca.is_some(),
        authentication = authenticated,
        "gRPC transport"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_warning_only_beyond_loopback() {
        let plain = SecurityArgs::default();
        let tls = SecurityArgs {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..SecurityArgs::default()
        };
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(!plaintext_beyond_loopback(addr("127.0.0.1:50051"), &plain));
        assert!(!plaintext_beyond_loopback(addr("[::1]:50051"), &plain));
        assert!(plaintext_beyond_loopback(addr("0.0.0.0:50051"), &plain));
        assert!(plaintext_beyond_loopback(addr("10.1.2.3:50051"), &plain));
        assert!(!plaintext_beyond_loopback(addr("0.0.0.0:50051"), &tls));
    }
}
