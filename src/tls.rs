//! TLS with rustls, both ways.
//!
//! Toward browsers (`https://` and `wss://`): the certificate chain and key come from
//! `[server] tls_cert` and `tls_key` (PEM), and are read again on SIGHUP. A reload
//! changes what new connections get; connections already open, and the console sessions
//! on them, keep the TLS state they were set up with. A reload that fails keeps the
//! certificate in use.
//!
//! Toward QEMU (`[upstream_tls]`): QEMU's certificate is verified against the configured
//! CA and the name of the host vizor connects to; vizor presents its own certificate
//! when configured (QEMU's `verify-peer`, libvirt's `vnc_tls_x509_verify`).

use crate::config::UpstreamTlsConfig;
use crate::libvirt::Target;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The TLS configuration of the front, reloadable.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    acceptor: RwLock<TlsAcceptor>,
}

impl Tls {
    /// Reads the certificate chain and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        Ok(Tls {
            acceptor: RwLock::new(acceptor(cert, key)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
        })
    }

    /// Reads the files again; on success new connections get the new certificate.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = acceptor(&self.cert, &self.key)?;
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The PEM certificates in `path` (at least one); errors name the `key`.
fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs = certificates("tls_cert", cert)?;
    check_private("tls_key", key)?;
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls_key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            format!(
                "tls_cert {} and tls_key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A private key others can read is refused, like vizor's own key files.
pub(crate) fn check_private(name: &str, key: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(key)
        .map_err(|e| format!("{name} {}: {e}", key.display()))?
        .mode()
        & 0o777;
    if mode & 0o007 != 0 {
        return Err(format!(
            "{name} {} is readable by others (mode {mode:o}); run: chmod o-rwx {}",
            key.display(),
            key.display()
        ));
    }
    Ok(())
}

/// Checks `[state]`'s TLS toward Redis at start, as the redis crate will use it on
/// every connection (where a mistake would only refuse sessions, one by one): the
/// system's trusted certificates readable (the crate reads them even with a `ca`),
/// some trusted CA, and a client certificate that goes with its key. Also makes ring
/// the process's TLS provider, which the crate's connections take.
pub(crate) fn check_redis_tls(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let native = rustls_native_certs::load_native_certs();
    if let Some(e) = native.errors.first() {
        return Err(format!(
            "[state]: the system's trusted certificates cannot be read ({e}; see SSL_CERT_FILE and SSL_CERT_DIR), and every TLS connection to Redis reads them"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in certificates("[state] ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("[state] ca {}: {e}", ca.display()))?;
            }
        }
        None if native.certs.is_empty() => {
            return Err(
                "[state]: rediss:// without ca, and the system trusts no certificate: set [state] ca to the CA of Redis's certificate"
                    .into(),
            )
        }
        None => {}
    }
    if let Some((cert, key)) = client {
        let chain = certificates("[state] client_cert", cert)?;
        check_private("[state] client_key", key)?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("[state] client_key {}: {e}", key.display()))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        builder
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| format!("[state] client_cert and client_key: {e}"))?;
    }
    Ok(())
}

/// TLS toward QEMU, from `[upstream_tls]`.
pub struct UpstreamTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
    /// Consoles that offer no TLS are refused.
    pub require: bool,
}

impl UpstreamTls {
    /// Reads the CA and, when configured, vizor's client certificate and key.
    pub fn load(config: &UpstreamTlsConfig) -> Result<UpstreamTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates("[upstream_tls] ca", &config.ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("[upstream_tls] ca {}: {e}", config.ca.display()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let tls =
            match (&config.client_cert, &config.client_key) {
                (None, None) => builder.with_no_client_auth(),
                (Some(cert), Some(key)) => {
                    let chain = certificates("[upstream_tls] client_cert", cert)?;
                    check_private("[upstream_tls] client_key", key)?;
                    let key_der = PrivateKeyDer::from_pem_file(key)
                        .map_err(|e| format!("[upstream_tls] client_key {}: {e}", key.display()))?;
                    builder
                        .with_client_auth_cert(chain, key_der)
                        .map_err(|e| format!("[upstream_tls] client_cert and client_key: {e}"))?
                }
                _ => return Err(
                    "[upstream_tls] client_cert and client_key go together: set both or neither"
                        .into(),
                ),
            };
        let server_name = config
            .server_name
            .as_deref()
            .map(|n| {
                ServerName::try_from(n.to_owned())
                    .map_err(|e| format!("[upstream_tls] server_name {n:?}: {e}"))
            })
            .transpose()?;
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(tls)),
            server_name,
            require: config.require,
        })
    }

    /// Runs the TLS handshake over `stream` to the console at `target`, verifying
    /// QEMU's certificate.
    /// `Err` says why, for the session's end.
    pub(crate) async fn connect<S>(
        &self,
        stream: S,
        target: &Target,
    ) -> Result<tokio_rustls::client::TlsStream<S>, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = match (&self.server_name, target) {
            (Some(n), _) => n.clone(),
            (None, Target::Tcp { host, .. }) => ServerName::try_from(host.clone()).map_err(|e| {
                format!("TLS to the VM console: {host:?} is no name to verify ({e}); set [upstream_tls] server_name")
            })?,
            (None, Target::Unix(_)) => {
                return Err(
                    "TLS to a VM console on a UNIX socket needs [upstream_tls] server_name".into(),
                )
            }
        };
        self.connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS to the VM console at {target} failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_tls_is_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = check_redis_tls(Some(&empty), None).unwrap_err();
        assert!(
            e.contains("[state] ca") && e.contains("no PEM certificate"),
            "{e}"
        );
        let missing = dir.path().join("missing.pem");
        let e = check_redis_tls(Some(&missing), None).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        // A client certificate without a readable key file.
        let e = check_redis_tls(None, Some((&empty, &missing))).unwrap_err();
        assert!(e.contains("[state]"), "{e}");
    }
}
