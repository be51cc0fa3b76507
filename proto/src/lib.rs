//! Generated protocol types and services.
//!
//! - [`joblet`]: the public API of joblet-core, wire-compatible with joblet-proto v2.5.9, plus
//!   our sequence-aware streams.
//! - [`persist`]: the query API of joblet-persist.
//! - [`ipc`]: the frames core sends to persist over the Unix socket, and persist's acks.

#[allow(clippy::all, clippy::pedantic)]
pub mod joblet {
    tonic::include_proto!("joblet");

    #[allow(clippy::all, clippy::pedantic)]
    pub mod persist {
        tonic::include_proto!("joblet.persist");
    }

    #[allow(clippy::all, clippy::pedantic)]
    pub mod ipc {
        tonic::include_proto!("joblet.ipc");
    }
}

pub use joblet::ipc;
pub use joblet::persist;
