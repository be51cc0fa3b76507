//! What joblet-core and joblet-persist share as daemons, apart from the replication protocol
//! (joblet-ipc):
//! - [`tls`]: mutual TLS for both gRPC listeners, roles from client certificates;
//! - [`client`]: the client half, which rnx uses alone (`default-features = false`: no server
//!   dependencies) and core uses to reach persist;
//! - [`config`]: the `grpc:` and `metrics:` sections and reading a daemon's YAML file;
//! - [`exporter`]: the Prometheus endpoint with the process figures and `joblet_build_info`;
//! - process plumbing (this module): logging to stderr, shutdown on SIGTERM/SIGINT (a second
//!   one exits at once), CPU priority, rate-limited repeated warnings, allocator tuning.

#[cfg(feature = "server")]
pub mod check;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod exporter;
#[cfg(feature = "server")]
mod process;
#[cfg(feature = "server")]
pub mod request_limit;
#[cfg(feature = "server")]
pub mod tls;

#[cfg(feature = "server")]
pub use process::*;

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, also after a thread panicked while holding it: the data is whatever that
/// thread left, and the daemon goes on (the panic was logged where it happened) rather than
/// failing every later caller.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for reading an `RwLock`.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for writing an `RwLock`.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
