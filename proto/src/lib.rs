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

/// Status of a job in persist's catalogue whose data came without a record (stored before
/// core replicated job records).
pub const UNKNOWN_STATUS: &str = "UNKNOWN";

impl persist::JobSummary {
    /// When the job was submitted (Unix ns): its record's, or else its first stored line's.
    pub fn created(&self) -> i64 {
        self.record
            .as_ref()
            .map_or(self.first_timestamp, |record| record.created)
    }

    /// The job's status from its record, or [`UNKNOWN_STATUS`].
    pub fn status(&self) -> &str {
        self.record
            .as_ref()
            .and_then(|record| record.job.as_ref())
            .map_or(UNKNOWN_STATUS, |job| job.status.as_str())
    }
}

pub mod wire;
