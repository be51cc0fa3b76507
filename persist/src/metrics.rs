//! Prometheus metric names of joblet-persist, with help text. The IPC receiver's names
//! (`joblet_persist_ipc_*`) live in `joblet_ipc::metrics`.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const WRITE_DURATION: &str = "joblet_persist_write_duration_seconds";
pub const QUERY_DURATION: &str = "joblet_persist_query_duration_seconds";
pub const QUERY_FIRST_RECORD: &str = "joblet_persist_query_first_record_seconds";
pub const QUERY_STALL: &str = "joblet_persist_query_stall_seconds";
pub const QUERY_OLDEST: &str = "joblet_persist_query_oldest_inflight_seconds";
pub const STORAGE_BYTES: &str = "joblet_persist_storage_bytes";
pub const STORAGE_CAPACITY_BYTES: &str = "joblet_persist_storage_capacity_bytes";
pub const FILESYSTEM_SIZE_BYTES: &str = "joblet_persist_filesystem_size_bytes";
pub const FILESYSTEM_AVAILABLE_BYTES: &str = "joblet_persist_filesystem_available_bytes";
pub const RETENTION_EXPIRED: &str = "joblet_persist_retention_expired_total";
pub const RETENTION_EVICTED_JOBS: &str = "joblet_persist_retention_evicted_jobs_total";
pub const RETENTION_EVICTED_BYTES: &str = "joblet_persist_retention_evicted_bytes_total";
pub const INDEX_BYTES: &str = "joblet_persist_index_bytes";
pub const LINES_STORED: &str = "joblet_persist_log_lines_stored_total";
pub const METRICS_STORED: &str = "joblet_persist_metric_samples_stored_total";
pub const METRICS_DOWNSAMPLED: &str = "joblet_persist_metric_samples_downsampled_total";
pub const JOB_RECORDS_STORED: &str = "joblet_persist_job_records_stored_total";
pub const DUPLICATES_SKIPPED: &str = "joblet_persist_duplicates_skipped_total";
pub const QUERY_ERRORS: &str = "joblet_persist_query_errors_total";
pub const UP: &str = "joblet_persist_up";

pub fn describe() {
    joblet_ipc::metrics::describe_receiver();
    joblet_daemon::tls::describe();
    describe_histogram!(
        WRITE_DURATION,
        Unit::Seconds,
        "Time to make one ingest batch durable (RocksDB write, with fsync under durability sync)."
    );
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "Server time of a query RPC, by rpc: from the request to the end of its stream, less \
         the time it waited for the client to take records (a client that reads slowly, or \
         pipes into a pager, does not count)."
    );
    describe_histogram!(
        QUERY_FIRST_RECORD,
        Unit::Seconds,
        "Server time from a query's request to its first record handed to the client, by rpc."
    );
    describe_gauge!(
        QUERY_STALL,
        Unit::Seconds,
        "The longest any running query's scan has worked without handing its client a record \
         (0 when none runs): a query stuck in the store shows here before it ends."
    );
    describe_gauge!(
        STORAGE_BYTES,
        Unit::Bytes,
        "Bytes used by the data directory."
    );
    describe_gauge!(
        STORAGE_CAPACITY_BYTES,
        Unit::Bytes,
        "Capacity the storage usage is measured against (config or filesystem size)."
    );
    describe_gauge!(
        FILESYSTEM_SIZE_BYTES,
        Unit::Bytes,
        "Size of the filesystem that holds the data directory."
    );
    describe_gauge!(
        FILESYSTEM_AVAILABLE_BYTES,
        Unit::Bytes,
        "Bytes persist can still write on the data directory's filesystem (whatever else fills \
         the volume counts too)."
    );
    describe_counter!(
        RETENTION_EXPIRED,
        "Records removed by retention during compaction, by column family."
    );
    describe_counter!(
        RETENTION_EVICTED_JOBS,
        "Jobs dropped whole by the retention pass, by reason: retention (every record expired) \
         or max_bytes (the size cap)."
    );
    describe_counter!(
        RETENTION_EVICTED_BYTES,
        "Log bytes (as stored, before compression) of the jobs the retention pass dropped, by \
         reason."
    );
    for reason in ["retention", "max_bytes"] {
        metrics::counter!(RETENTION_EVICTED_JOBS, "reason" => reason).absolute(0);
        metrics::counter!(RETENTION_EVICTED_BYTES, "reason" => reason).absolute(0);
    }
    describe_gauge!(
        INDEX_BYTES,
        Unit::Bytes,
        "Memory held by RocksDB index and filter blocks."
    );
    describe_counter!(LINES_STORED, "Log lines stored.");
    describe_counter!(METRICS_STORED, "Metric samples stored.");
    describe_counter!(
        METRICS_DOWNSAMPLED,
        "Metric samples older than retention.metrics_full_resolution rolled up into 1-minute \
         records."
    );
    describe_counter!(
        JOB_RECORDS_STORED,
        "Versions of job records (the catalogue of past jobs) stored."
    );
    describe_counter!(
        DUPLICATES_SKIPPED,
        "Replicated records already stored (replays after a reconnect), skipped."
    );
    describe_counter!(
        QUERY_ERRORS,
        "Query RPCs that ended with an error, by rpc and code."
    );
    describe_gauge!(UP, "1 while joblet-persist is serving.");
    metrics::counter!(DUPLICATES_SKIPPED).absolute(0);
    metrics::counter!(LINES_STORED).absolute(0);
    metrics::counter!(METRICS_STORED).absolute(0);
    metrics::counter!(METRICS_DOWNSAMPLED).absolute(0);
    metrics::counter!(JOB_RECORDS_STORED).absolute(0);
    joblet_daemon::exporter::publish_build_info("joblet-persist", env!("CARGO_PKG_VERSION"));
    for rpc in ["QueryLogs", "QueryMetrics"] {
        // Registered empty so that latency rules and dashboards have series from the start.
        let _ = metrics::histogram!(QUERY_DURATION, "rpc" => rpc);
        let _ = metrics::histogram!(QUERY_FIRST_RECORD, "rpc" => rpc);
    }
    metrics::gauge!(QUERY_STALL).set(0.0);
    metrics::gauge!(QUERY_OLDEST).set(0.0);
    describe_gauge!(
        QUERY_OLDEST,
        Unit::Seconds,
        "Age of the oldest query being answered, the time its client takes to read included \
         (0 when none runs)."
    );
}
