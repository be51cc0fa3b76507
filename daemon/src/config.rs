//! The configuration sections both daemons have (`grpc:`, `metrics:`) and reading a daemon's
//! YAML file. Each daemon names its defaults (ports, request size) in a [`Defaults`] type, so a
//! section given only in part is completed with that daemon's defaults.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytesize::ByteSize;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::tls::TlsFiles;

/// A daemon's defaults for the shared sections.
pub trait Defaults: Debug + Clone + 'static {
    const GRPC_PORT: u16;
    const MAX_REQUEST_MIB: u64;
    const METRICS_PORT: u16;
}

/// The `grpc:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, bound = "")]
pub struct GrpcConfig<D: Defaults> {
    pub listen: SocketAddr,
    /// Server certificate, key and the CA client certificates must chain to (mutual TLS).
    pub tls: Option<TlsFiles>,
    /// Plaintext gRPC without client certificates: only on a loopback address, and only when
    /// set explicitly.
    pub insecure: bool,
    /// Largest request message accepted.
    pub max_request_size: ByteSize,
    #[serde(skip)]
    pub daemon: PhantomData<D>,
}

impl<D: Defaults> Default for GrpcConfig<D> {
    fn default() -> Self {
        GrpcConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], D::GRPC_PORT)),
            tls: Some(TlsFiles {
                cert: PathBuf::from("/etc/joblet/certs/server.pem"),
                key: PathBuf::from("/etc/joblet/certs/server-key.pem"),
                ca: PathBuf::from("/etc/joblet/certs/ca.pem"),
            }),
            insecure: false,
            max_request_size: ByteSize::mib(D::MAX_REQUEST_MIB),
            daemon: PhantomData,
        }
    }
}

/// The `metrics:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, bound = "")]
pub struct MetricsConfig<D: Defaults> {
    /// Prometheus exporter address; null disables it.
    pub listen: Option<SocketAddr>,
    #[serde(skip)]
    pub daemon: PhantomData<D>,
}

impl<D: Defaults> Default for MetricsConfig<D> {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], D::METRICS_PORT))),
            daemon: PhantomData,
        }
    }
}

/// Parses a daemon's YAML configuration (an empty text is the defaults) and validates it.
pub fn parse<T: DeserializeOwned + Default>(
    text: &str,
    validate: impl FnOnce(&T) -> anyhow::Result<()>,
) -> anyhow::Result<T> {
    let config = if text.trim().is_empty() {
        T::default()
    } else {
        serde_norway::from_str(text)?
    };
    validate(&config)?;
    Ok(config)
}

/// Reads, parses and validates a daemon's configuration file; errors name the file.
pub fn load<T: DeserializeOwned + Default>(
    path: &Path,
    validate: impl FnOnce(&T) -> anyhow::Result<()>,
) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
    parse(&text, validate).with_context(|| format!("config {}", path.display()))
}
