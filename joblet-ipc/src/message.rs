//! Building and checking the envelopes that travel on the replication stream.

use bytes::Bytes;
use joblet_proto::ipc::{IpcMessage, LogData, MessageType, MetricData, Stream};
use prost::Message;

/// The protocol version this crate speaks. A receiver rejects other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// An envelope carrying one log line.
pub fn log_message(
    job_id: &str,
    sequence: u64,
    timestamp_ns: i64,
    stream: Stream,
    content: Bytes,
) -> IpcMessage {
    let data = LogData {
        stream: stream as i32,
        content,
    };
    envelope(
        MessageType::Log,
        job_id,
        sequence,
        timestamp_ns,
        data.encode_to_vec(),
    )
}

/// An envelope carrying one metric sample.
pub fn metric_message(
    job_id: &str,
    sequence: u64,
    timestamp_ns: i64,
    sample: &MetricData,
) -> IpcMessage {
    envelope(
        MessageType::Metric,
        job_id,
        sequence,
        timestamp_ns,
        sample.encode_to_vec(),
    )
}

fn envelope(
    kind: MessageType,
    job_id: &str,
    sequence: u64,
    timestamp_ns: i64,
    data: Vec<u8>,
) -> IpcMessage {
    IpcMessage {
        version: PROTOCOL_VERSION,
        r#type: kind as i32,
        job_id: job_id.to_owned(),
        timestamp: timestamp_ns,
        sequence,
        data: data.into(),
    }
}

/// Why a received envelope was refused (each one is a `reason` label of the rejection counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("unsupported protocol version")]
    Version,
    #[error("empty job id")]
    EmptyJobId,
    #[error("unknown message type")]
    Type,
}

impl InvalidMessage {
    pub fn reason(self) -> &'static str {
        match self {
            InvalidMessage::Version => "version",
            InvalidMessage::EmptyJobId => "empty_job_id",
            InvalidMessage::Type => "type",
        }
    }
}

/// Checks the envelope fields a receiver relies on; the payload is checked by whoever decodes it.
pub fn validate(message: &IpcMessage) -> Result<MessageType, InvalidMessage> {
    if message.version != PROTOCOL_VERSION {
        return Err(InvalidMessage::Version);
    }
    if message.job_id.is_empty() {
        return Err(InvalidMessage::EmptyJobId);
    }
    match MessageType::try_from(message.r#type) {
        Ok(kind @ (MessageType::Log | MessageType::Metric)) => Ok(kind),
        _ => Err(InvalidMessage::Type),
    }
}
