//! The replication stream of ADR-0001: joblet-core sends every log line and metric sample of
//! every job to joblet-persist over a Unix socket.
//!
//! # Wire format
//! Each frame is a 4-byte big-endian length followed by one protobuf message ([`codec`]).
//! Core sends `joblet.ipc.IPCMessage` frames; persist answers with `joblet.ipc.IPCAck` frames.
//! Frames over the configured maximum (default 8 MiB), frames that do not decode and streams
//! that end inside a frame close the connection and are counted by reason; an envelope with an
//! unknown version, an empty job id or an unknown type is counted and skipped.
//!
//! # Ordering
//! One queue and one writer per sender, one reader per connection: messages of a job arrive at
//! the sink in the order they were queued.
//!
//! # What an acknowledgement promises
//! An ack `(job_id, type, N)` means: the message of that job and type with sequence `N`, and every
//! message of that job and type that persist received before it on the same connection, are
//! durable under persist's configured durability policy (see `joblet-persist`'s `durability`
//! setting). It says nothing about sequences persist never received — a message the sender
//! dropped (and counted) is not covered, so a sender that wants completeness compares the acked
//! sequence with what it has dropped or not yet sent, and replays those from its own spool.
//! Acks for one job and type only grow; [`IpcSender::acknowledged`] reports the highest seen.
//!
//! # Not blocking the job path
//! [`IpcSender::try_send`] never waits: a full queue drops the message and counts it in
//! `joblet_ipc_messages_dropped_total{reason}` (`queue_full` while connected, `disconnected`
//! while persist is unreachable).

pub mod batch;
pub mod codec;
pub mod message;
pub mod metrics;
mod queue;
pub mod receiver;
pub mod sender;

pub use batch::{Batch, Envelope};
pub use codec::{DEFAULT_MAX_FRAME_BYTES, FrameCodec, FrameError};
pub use joblet_proto::ipc::{
    IpcAck, IpcMessage, LogData, MessageType, MetricData, Refusal, RefusalReason, Stream,
};
pub use message::{
    Frame, LogPayload, PROTOCOL_VERSION, gap_message, log_message, log_payload, metric_message,
    now_ns,
};
pub use receiver::{IpcReceiver, MessageSink, ReceiverConfig, ReceiverStats};
pub use sender::{IpcSender, SendError, SenderConfig, SenderStats};
