//! Mutual TLS for both daemons' gRPC listeners, and roles from client certificates.
//!
//! Listeners speak TLS 1.3 only. A client certificate is requested and, when presented, must
//! chain to the configured CA (otherwise the handshake fails). A connection without one is
//! accepted at the TLS level so that its calls can be answered UNAUTHENTICATED rather than
//! with a bare handshake error. The role is the certificate subject's Organizational Unit:
//! `admin` may call everything, `viewer` only what the daemon lists as read-only. Every denial
//! is logged with the peer and the RPC and counted in `joblet_auth_denied_total{reason}`.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Certificate files (PEM) of a TLS endpoint, as they appear in the daemons' configs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

impl TlsFiles {
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config(&self.cert, &self.key, &self.ca)
    }

    /// A tonic client configuration presenting this certificate.
    pub fn client_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read_to_string(path).map_err(|e| read_error(what, path, e))
        };
        Ok(crate::client::tls_config(
            &read("tls.ca", &self.ca)?,
            &read("tls.cert", &self.cert)?,
            &read("tls.key", &self.key)?,
        ))
    }
}

/// The listener rule both daemons share: mutual TLS, or plaintext explicitly asked for
/// (`grpc.insecure`) and only on a loopback address.
pub fn check_listener(
    listen: SocketAddr,
    tls: Option<&TlsFiles>,
    insecure: bool,
) -> Result<(), String> {
    if insecure && !listen.ip().is_loopback() {
        return Err(format!(
            "grpc.insecure: plaintext is refused on the non-loopback address {listen}"
        ));
    }
    if !insecure && tls.is_none() {
        return Err(
            "grpc.tls: certificates are required (or grpc.insecure: true on a loopback address)"
                .into(),
        );
    }
    Ok(())
}

/// What a listener serves with: the TLS configuration (None for plaintext, warned about) and
/// the matching role check.
pub fn listener_security(
    listen: SocketAddr,
    tls: Option<&TlsFiles>,
    insecure: bool,
    read_only: ReadOnly,
) -> Result<(Option<Arc<rustls::ServerConfig>>, AuthLayer), TlsError> {
    match tls.filter(|_| !insecure) {
        Some(files) => Ok((Some(files.server_config()?), AuthLayer::new(read_only))),
        None => {
            tracing::warn!(%listen, "grpc.insecure: serving plaintext gRPC without client certificates");
            Ok((None, AuthLayer::disabled()))
        }
    }
}

pub const AUTH_DENIED: &str = "joblet_auth_denied_total";
/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read_error(what: &'static str, path: &Path, error: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        message: error.to_string(),
    }
}

pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(what, path, e))?;
    if certs.is_empty() {
        return Err(read_error(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| read_error(what, path, e))
}

/// A TLS 1.3 server configuration with an (optional at TLS level) CA-verified client cert.
pub fn server_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca_cert in load_certs("tls.ca", ca)? {
        roots
            .add(ca_cert)
            .map_err(|e| read_error("tls.ca", ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs("tls.cert", cert)?, load_key("tls.key", key)?)
        .map_err(|e| TlsError::Config(format!("tls.cert/tls.key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

pub type TlsIncoming = tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<TcpStream>>>;

/// Accepts TCP connections and completes TLS handshakes off the accept loop; yields only
/// connections whose handshake succeeded (failures are logged and counted).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> TlsIncoming {
    let (accepted, stream) = tokio::sync::mpsc::channel(ACCEPTED_BACKLOG);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                result = listener.accept() => match result {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = accepted.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => deny_handshake(peer, &error.to_string()),
                    Err(_) => deny_handshake(peer, "handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(stream)
}

/// A daemon's gRPC router: its services behind the [`AuthLayer`], then the
/// [`RequestLimitLayer`](crate::request_limit::RequestLimitLayer).
pub type AuthRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<
        crate::request_limit::RequestLimitLayer,
        tower::layer::util::Stack<AuthLayer, tower::layer::util::Identity>,
    >,
>;

/// Serves `router` on `listener` until `shutdown`: over TLS when `tls` is given (see
/// [`incoming`]), else plaintext with TCP_NODELAY.
pub async fn serve(
    router: AuthRouter,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(
                    incoming(listener, tls, shutdown.clone()),
                    shutdown.cancelled(),
                )
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown.cancelled(),
                )
                .await
        }
    }
}

/// Refused handshakes are logged at the first, then at most once a minute with the count: a
/// misconfigured client retrying must not flood the log.
static HANDSHAKE_REFUSALS_LOG: crate::LogLimiter = crate::LogLimiter::new(Duration::from_secs(60));

fn deny_handshake(peer: SocketAddr, error: &str) {
    // rustls reads a plaintext HTTP/2 preface as a record of an unknown type.
    let plaintext = error.contains("InvalidContentType");
    let reason = if plaintext { "plaintext" } else { "handshake" };
    metrics::counter!(AUTH_DENIED, "reason" => reason).increment(1);
    if let Some(refused) = HANDSHAKE_REFUSALS_LOG.hit() {
        if plaintext {
            tracing::warn!(%peer, refused, "plaintext connection refused: this server speaks TLS only (grpc.tls); the client needs a certificate config");
        } else {
            tracing::warn!(%peer, error, refused, "TLS handshake refused");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Viewer,
}

/// The Organizational Unit of a certificate's subject.
pub fn organizational_unit(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .map(str::to_owned)
}

/// Which calls need admin: a function from the gRPC path ("/pkg.Service/Method") to whether
/// a viewer may make it.
pub type ReadOnly = fn(&str) -> bool;

/// Tower layer checking every call's role before it reaches the services; `None` (plaintext
/// listeners) lets every call through.
#[derive(Clone)]
pub struct AuthLayer {
    read_only: Option<ReadOnly>,
}

impl AuthLayer {
    pub fn new(read_only: ReadOnly) -> Self {
        AuthLayer {
            read_only: Some(read_only),
        }
    }

    pub fn disabled() -> Self {
        AuthLayer { read_only: None }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            read_only: self.read_only,
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    read_only: Option<ReadOnly>,
}

/// Zero-initialises the denial counter for every reason.
pub fn describe() {
    metrics::describe_counter!(AUTH_DENIED, "Calls or connections refused, by reason.");
    for reason in [
        "handshake",
        "plaintext",
        "no_certificate",
        "unknown_role",
        "forbidden",
    ] {
        metrics::counter!(AUTH_DENIED, "reason" => reason).absolute(0);
    }
}

fn check<B>(
    request: &http::Request<B>,
    read_only: ReadOnly,
) -> Result<(), (tonic::Status, &'static str)> {
    let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    let certs = info.and_then(|i| i.peer_certs());
    let Some(cert) = certs.as_ref().and_then(|c| c.first()) else {
        return Err((
            tonic::Status::unauthenticated("a client certificate is required"),
            "no_certificate",
        ));
    };
    let role = match organizational_unit(cert).as_deref() {
        Some("admin") => Role::Admin,
        Some("viewer") => Role::Viewer,
        other => {
            return Err((
                tonic::Status::permission_denied(format!(
                    "certificate role (OU) {other:?} is neither admin nor viewer"
                )),
                "unknown_role",
            ));
        }
    };
    if role == Role::Viewer && !read_only(request.uri().path()) {
        return Err((
            tonic::Status::permission_denied(format!(
                "{} needs the admin role; this certificate is a viewer",
                request.uri().path()
            )),
            "forbidden",
        ));
    }
    Ok(())
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(read_only) = self.read_only else {
            return Box::pin(self.inner.call(request));
        };
        match check(&request, read_only) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err((status, reason)) => {
                let peer = request
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr());
                tracing::warn!(
                    peer = ?peer,
                    rpc = request.uri().path(),
                    reason,
                    "call refused"
                );
                metrics::counter!(AUTH_DENIED, "reason" => reason).increment(1);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
