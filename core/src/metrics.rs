//! Prometheus metric names of joblet-core, with help text. The replication sender's names
//! (`joblet_ipc_*`) live in `joblet_ipc::metrics`.

use metrics::{describe_counter, describe_gauge};

pub const JOBS: &str = "joblet_core_jobs";
pub const JOBS_STARTED: &str = "joblet_core_jobs_started_total";
pub const JOB_FAILURES: &str = "joblet_core_job_failures_total";
pub const UP: &str = "joblet_core_up";
pub const REPLICATION_BEHIND: &str = "joblet_core_replication_behind_lines";

pub fn describe() {
    joblet_ipc::metrics::describe_sender();
    joblet_ipc::tls::describe();
    describe_gauge!(JOBS, "Jobs known to core, by state.");
    describe_counter!(JOBS_STARTED, "Jobs whose process was started.");
    describe_counter!(
        JOB_FAILURES,
        "Jobs that ended FAILED (non-zero exit, out of memory, timeout, start error)."
    );
    describe_gauge!(UP, "1 while joblet-core is serving.");
    describe_gauge!(
        REPLICATION_BEHIND,
        "Log lines in job spools that joblet-persist has not acknowledged yet (replication waits \
         rather than drop, so this, not the drop counter, shows persist falling behind)."
    );
    metrics::counter!(JOBS_STARTED).absolute(0);
    metrics::counter!(JOB_FAILURES).absolute(0);
    metrics::gauge!(REPLICATION_BEHIND).set(0.0);
}
