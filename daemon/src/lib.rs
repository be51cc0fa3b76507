//! What joblet-core and joblet-persist share as daemons, apart from the replication protocol
//! (joblet-ipc):
//! - [`tls`]: mutual TLS for both gRPC listeners, roles from client certificates;
//! - [`client`]: the client half, which rnx uses alone (`default-features = false`: no server
//!   dependencies) and core uses to reach persist;
//! - [`config`]: the `grpc:` and `metrics:` sections and reading a daemon's YAML file;
//! - [`exporter`]: the Prometheus endpoint with the process figures and `joblet_build_info`;
//! - process plumbing (this module): logging to stderr, shutdown on SIGTERM/SIGINT (a second
//!   one exits at once), CPU priority, rate-limited repeated warnings, allocator tuning.

pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod exporter;
#[cfg(feature = "server")]
mod process;
#[cfg(feature = "server")]
pub mod tls;

#[cfg(feature = "server")]
pub use process::*;
