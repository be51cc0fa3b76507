//! Prometheus metric names of joblet-core, with help text. The replication sender's names
//! (`joblet_ipc_*`) live in `joblet_ipc::metrics`.

use metrics::{describe_counter, describe_gauge};

pub const JOBS: &str = "joblet_core_jobs";
pub const JOBS_STARTED: &str = "joblet_core_jobs_started_total";
pub const JOB_FAILURES: &str = "joblet_core_job_failures_total";
pub const UP: &str = "joblet_core_up";
pub const REPLICATION_BEHIND: &str = "joblet_core_replication_behind_lines";
/// Why lines are behind (`joblet_core_replication_behind_lines{reason}`): persist unreachable,
/// refusing to store (disk full, I/O errors), or connected and not done yet.
pub const BEHIND_REASONS: [&str; 3] = ["disconnected", "persist_refusing", "persist_busy"];
pub const REPLICATION_OLDEST_UNACKED: &str = "joblet_core_replication_oldest_unacked_seconds";
pub const JOBS_EVICTED: &str = "joblet_core_jobs_evicted_total";
pub use joblet_ipc::metrics::REPLICATION_LINES_LOST;
pub const SPOOL_BYTES: &str = "joblet_core_spool_bytes";
pub const STATE_SKIPPED_BYTES: &str = "joblet_core_state_skipped_bytes_total";
pub const STATE_WRITE_ERRORS: &str = "joblet_core_state_write_errors_total";
pub const JOBS_RESTORED: &str = "joblet_core_jobs_restored_total";
pub const JOBS_REATTACHED: &str = "joblet_core_jobs_reattached_total";

pub fn describe() {
    joblet_ipc::metrics::describe_sender();
    joblet_daemon::tls::describe();
    describe_gauge!(JOBS, "Jobs known to core, by state.");
    describe_counter!(JOBS_STARTED, "Jobs whose process was started.");
    describe_counter!(
        JOB_FAILURES,
        "Jobs that ended FAILED (non-zero exit, out of memory, timeout, start error)."
    );
    describe_gauge!(UP, "1 while joblet-core is serving.");
    describe_gauge!(
        REPLICATION_BEHIND,
        "Log lines in job spools that joblet-persist has not acknowledged yet, by why \
         (disconnected, persist_refusing: it cannot store, persist_busy: connected, not done); \
         replication waits rather than drop, so this, not the drop counter, shows persist \
         falling behind."
    );
    describe_counter!(
        JOBS_EVICTED,
        "Finished jobs core dropped with their spools, by reason: replicated (acknowledged by \
         joblet-persist and older than jobs.keep_finished) or spool_max_bytes (persist disabled, \
         spools over the cap)."
    );
    describe_gauge!(
        SPOOL_BYTES,
        "Bytes in the spools (log and metrics) of the jobs core holds."
    );
    describe_counter!(
        STATE_SKIPPED_BYTES,
        "Unreadable bytes skipped when core's state journal was read at start."
    );
    describe_counter!(
        STATE_WRITE_ERRORS,
        "State changes core could not record in its journal (lost if core restarts)."
    );
    describe_counter!(
        JOBS_RESTORED,
        "Jobs read back from core's state journal at start."
    );
    describe_counter!(
        JOBS_REATTACHED,
        "Running jobs whose supervisor an earlier run of core started, re-attached at start."
    );
    for reason in ["replicated", "spool_max_bytes"] {
        metrics::counter!(JOBS_EVICTED, "reason" => reason).absolute(0);
    }
    metrics::counter!(STATE_SKIPPED_BYTES).absolute(0);
    metrics::counter!(STATE_WRITE_ERRORS).absolute(0);
    metrics::counter!(JOBS_RESTORED).absolute(0);
    metrics::counter!(JOBS_REATTACHED).absolute(0);
    metrics::gauge!(SPOOL_BYTES).set(0.0);
    metrics::counter!(JOBS_STARTED).absolute(0);
    metrics::counter!(JOB_FAILURES).absolute(0);
    for reason in BEHIND_REASONS {
        metrics::gauge!(REPLICATION_BEHIND, "reason" => reason).set(0.0);
    }
    describe_gauge!(
        REPLICATION_OLDEST_UNACKED,
        "How long the job furthest behind has had spooled lines joblet-persist has not \
         acknowledged (0 when nothing is behind)."
    );
    metrics::gauge!(REPLICATION_OLDEST_UNACKED).set(0.0);
    joblet_daemon::exporter::publish_build_info("joblet-core", env!("CARGO_PKG_VERSION"));
}
