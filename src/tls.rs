//! TLS toward browsers (`https://` and `wss://`) with rustls: the certificate chain and
//! key come from `[server] tls_cert` and `tls_key` (PEM), and are read again on SIGHUP.
//! A reload changes what new connections get; connections already open, and the console
//! sessions on them, keep the TLS state they were set up with. A reload that fails
//! keeps the certificate in use.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

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

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_cert {}: no PEM certificate in it",
            cert.display()
        ));
    }
    check_private(key)?;
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls_key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
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
fn check_private(key: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(key)
        .map_err(|e| format!("tls_key {}: {e}", key.display()))?
        .mode()
        & 0o777;
    if mode & 0o007 != 0 {
        return Err(format!(
            "tls_key {} is readable by others (mode {mode:o}); run: chmod o-rwx {}",
            key.display(),
            key.display()
        ));
    }
    Ok(())
}
