//! Prometheus metric names emitted by this crate, with their help text.
//!
//! The sender's metrics are joblet-core's (`joblet_ipc_*`); the receiver's are joblet-persist's
//! (`joblet_persist_ipc_*`). Alert rules in `deploy/prometheus/` refer to these names.
//! [`serve_exporter`] is the Prometheus endpoint both daemons share, with their process
//! figures (`process_*`: resident memory, CPU seconds, open file descriptors).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const IPC_MESSAGES_SENT: &str = "joblet_ipc_messages_sent_total";
pub const IPC_MESSAGES_DROPPED: &str = "joblet_ipc_messages_dropped_total";
pub const IPC_QUEUE_DEPTH: &str = "joblet_ipc_queue_depth";
pub const IPC_QUEUE_CAPACITY: &str = "joblet_ipc_queue_capacity";
pub const IPC_CONNECTED: &str = "joblet_ipc_connected";
pub const IPC_RECONNECTS: &str = "joblet_ipc_reconnects_total";
pub const IPC_CONNECT_ATTEMPTS: &str = "joblet_ipc_connect_attempts_total";
pub const IPC_ACKS_RECEIVED: &str = "joblet_ipc_acks_received_total";
pub const IPC_WRITE_DURATION: &str = "joblet_ipc_write_duration_seconds";
pub const IPC_MESSAGES_RESENT: &str = "joblet_ipc_messages_resent_total";
pub const IPC_MESSAGES_REFUSED: &str = "joblet_ipc_messages_refused_total";
/// joblet-core's count of log lines lost to replication (the sender counts those persist
/// refused; core those it could not send).
pub const REPLICATION_LINES_LOST: &str = "joblet_core_replication_lines_lost_total";

pub const PERSIST_IPC_MESSAGES_RECEIVED: &str = "joblet_persist_ipc_messages_received_total";
pub const PERSIST_IPC_FRAMES_REJECTED: &str = "joblet_persist_ipc_frames_rejected_total";
pub const PERSIST_IPC_CONNECTIONS: &str = "joblet_persist_ipc_connections";
pub const PERSIST_IPC_CONNECTIONS_REFUSED: &str = "joblet_persist_ipc_connections_refused_total";
pub const PERSIST_INGEST_ERRORS: &str = "joblet_persist_ingest_errors_total";

/// Reasons persist refuses messages (`joblet_ipc_messages_refused_total{reason}` in core,
/// `joblet_persist_ingest_errors_total{reason}` in persist), as [`refusal_label`] gives them.
pub const REFUSAL_REASONS: [&str; 3] = ["frame_too_large", "bad_payload", "store_failed"];

/// The `reason` label of a refusal, the same on both ends of the stream.
pub fn refusal_label(reason: joblet_proto::ipc::RefusalReason) -> &'static str {
    use joblet_proto::ipc::RefusalReason;
    match reason {
        RefusalReason::FrameTooLarge => "frame_too_large",
        RefusalReason::BadPayload => "bad_payload",
        RefusalReason::StoreFailed => "store_failed",
        RefusalReason::Unspecified => "other",
    }
}
/// Reasons log lines are lost (`joblet_core_replication_lines_lost_total{reason}`).
pub const LINES_LOST_REASONS: [&str; 3] = ["oversized", "frame_too_large", "bad_payload"];

/// Reasons a sender drops a message (`joblet_ipc_messages_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 4] = ["queue_full", "disconnected", "oversized", "shutdown"];
/// Reasons a receiver rejects a frame (`joblet_persist_ipc_frames_rejected_total{reason}`).
pub const REJECT_REASONS: [&str; 7] = [
    "oversized",
    "truncated",
    "decode",
    "version",
    "empty_job_id",
    "type",
    "payload",
];

/// Registers help text for the sender's metrics (call once, from joblet-core), and creates
/// its counters at zero so that rates and alerts see them before the first event.
pub fn describe_sender() {
    metrics::counter!(IPC_MESSAGES_SENT).absolute(0);
    metrics::counter!(IPC_RECONNECTS).absolute(0);
    metrics::counter!(IPC_CONNECT_ATTEMPTS).absolute(0);
    metrics::counter!(IPC_ACKS_RECEIVED).absolute(0);
    describe_counter!(
        IPC_ACKS_RECEIVED,
        "Acknowledgements received from joblet-persist: while lines are behind, a counter that \
         does not grow means replication is stalled."
    );
    describe_counter!(
        IPC_CONNECT_ATTEMPTS,
        "Attempts to connect to joblet-persist, successful or not (reconnects_total counts \
         the successful reconnects)."
    );
    for reason in DROP_REASONS {
        metrics::counter!(IPC_MESSAGES_DROPPED, "reason" => reason).absolute(0);
    }
    metrics::counter!(IPC_MESSAGES_RESENT).absolute(0);
    describe_counter!(
        IPC_MESSAGES_RESENT,
        "Messages written again after a reconnect (persist had not acknowledged them); \
         messages_sent_total counts them too."
    );
    for reason in REFUSAL_REASONS {
        metrics::counter!(IPC_MESSAGES_REFUSED, "reason" => reason).absolute(0);
    }
    describe_counter!(
        IPC_MESSAGES_REFUSED,
        "Messages joblet-persist answered it could not take, by reason (frame_too_large, \
         bad_payload; store_failed counts refused batches)."
    );
    for reason in LINES_LOST_REASONS {
        metrics::counter!(REPLICATION_LINES_LOST, "reason" => reason).absolute(0);
    }
    describe_counter!(
        REPLICATION_LINES_LOST,
        "Log lines that could not be replicated, by reason (oversized: over core's \
         persist.max_frame_size; frame_too_large: over persist's ipc.max_frame_size; \
         bad_payload). Each is stored as a gap marker rnx shows; the job's later lines flow."
    );
    describe_counter!(IPC_MESSAGES_SENT, "Messages written to the persist socket.");
    describe_counter!(
        IPC_MESSAGES_DROPPED,
        "Messages not replicated, by reason (queue_full, disconnected, oversized, shutdown)."
    );
    describe_gauge!(
        IPC_QUEUE_DEPTH,
        "Messages waiting in the replication queue."
    );
    describe_gauge!(IPC_QUEUE_CAPACITY, "Capacity of the replication queue.");
    describe_gauge!(
        IPC_CONNECTED,
        "1 while connected to joblet-persist, else 0."
    );
    describe_counter!(
        IPC_RECONNECTS,
        "Successful reconnections to joblet-persist."
    );
    describe_histogram!(
        IPC_WRITE_DURATION,
        Unit::Seconds,
        "Time to write one batch of frames to the persist socket."
    );
}

/// Registers help text for the receiver's metrics (call once, from joblet-persist), and
/// creates its counters at zero.
pub fn describe_receiver() {
    metrics::counter!(PERSIST_IPC_MESSAGES_RECEIVED).absolute(0);
    metrics::gauge!(PERSIST_IPC_CONNECTIONS).set(0.0);
    metrics::counter!(PERSIST_IPC_CONNECTIONS_REFUSED, "reason" => "max_connections").absolute(0);
    describe_counter!(
        PERSIST_IPC_CONNECTIONS_REFUSED,
        "IPC connections closed at once, by reason (max_connections: ipc.max_connections open)."
    );
    for reason in REJECT_REASONS {
        metrics::counter!(PERSIST_IPC_FRAMES_REJECTED, "reason" => reason).absolute(0);
    }
    for reason in REFUSAL_REASONS {
        metrics::counter!(PERSIST_INGEST_ERRORS, "reason" => reason).absolute(0);
    }
    describe_counter!(
        PERSIST_INGEST_ERRORS,
        "Replicated data persist could not take, by reason: frame_too_large and bad_payload \
         count messages (a log line is stored as a gap marker), store_failed counts batches \
         (disk full, I/O or flush error; the sender resends them). Each is answered in-band."
    );
    describe_counter!(
        PERSIST_IPC_MESSAGES_RECEIVED,
        "Valid messages received from joblet-core."
    );
    describe_counter!(
        PERSIST_IPC_FRAMES_REJECTED,
        "Frames or messages refused, by reason (oversized, truncated, decode, version, empty_job_id, type)."
    );
    describe_gauge!(
        PERSIST_IPC_CONNECTIONS,
        "Open IPC connections from joblet-core."
    );
}
