//! Building and checking the envelopes that travel on the replication stream.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use joblet_proto::ipc::{IpcMessage, LogData, MessageType, MetricData, Stream};
use prost::Message;

/// Payloads are encoded one after another into a per-thread buffer of this size and split
/// off it: many messages share one allocation instead of one each.
const PAYLOAD_ARENA_BYTES: usize = 256 * 1024;

thread_local! {
    static PAYLOADS: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

fn encode_payload(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    PAYLOADS.with_borrow_mut(|arena| {
        if arena.capacity() - arena.len() < len {
            *arena = BytesMut::with_capacity(PAYLOAD_ARENA_BYTES.max(len));
        }
        // Room was made above, so the unchecked encoding cannot run out of space.
        message.encode_raw(arena);
        arena.split().freeze()
    })
}

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
        encode_payload(&data),
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
        encode_payload(sample),
    )
}

fn envelope(
    kind: MessageType,
    job_id: &str,
    sequence: u64,
    timestamp_ns: i64,
    data: Bytes,
) -> IpcMessage {
    IpcMessage {
        version: PROTOCOL_VERSION,
        r#type: kind as i32,
        job_id: job_id.to_owned(),
        timestamp: timestamp_ns,
        sequence,
        data,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_sharing_an_arena_decode_back_across_its_boundaries() {
        let contents: Vec<Vec<u8>> = (0..6000u32)
            .map(|i| {
                let len = if i == 3000 {
                    300 * 1024
                } else {
                    (i % 200) as usize
                };
                vec![(i % 251) as u8; len]
            })
            .collect();
        let messages: Vec<IpcMessage> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| log_message("job", i as u64, 0, Stream::Stderr, c.clone().into()))
            .collect();
        for (message, content) in messages.iter().zip(&contents) {
            let data = LogData::decode(message.data.clone()).unwrap();
            assert_eq!(data.content.as_ref(), content.as_slice());
            assert_eq!(data.stream, Stream::Stderr as i32);
        }
    }
}
