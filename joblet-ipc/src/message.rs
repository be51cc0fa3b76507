//! Building and checking the envelopes that travel on the replication stream.

use bytes::{BufMut, Bytes, BytesMut};
use joblet_proto::ipc::{IpcMessage, LogData, MessageType, MetricData, Stream};
use joblet_proto::wire::{
    self, ipc_message, length_delimited, log_data, next_is, read_bytes, read_varint,
};
use prost::Message;

use crate::codec::LENGTH_PREFIX_BYTES;

/// One message to send, described by borrowed data and encoded as one frame (the length prefix
/// and an `IPCMessage`) straight into the sender's queue: on the hot path ([`Frame::log`],
/// [`Frame::metric`]) no `IpcMessage` is built and nothing is allocated per message.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    body: Body<'a>,
    /// Length of the encoded `IPCMessage`.
    body_len: usize,
}

#[derive(Debug, Clone, Copy)]
enum Body<'a> {
    Log {
        envelope: Fields<'a>,
        /// Stream as its int32 wire value, sign-extended as prost does.
        stream: u64,
        content: &'a [u8],
        partial: bool,
    },
    Metric {
        envelope: Fields<'a>,
        sample: &'a MetricData,
    },
    Message(&'a IpcMessage),
}

/// The envelope fields of a frame built from borrowed data, in wire form.
#[derive(Debug, Clone, Copy)]
struct Fields<'a> {
    kind: u64,
    job_id: &'a str,
    timestamp: u64,
    sequence: u64,
    payload_len: usize,
}

impl Fields<'_> {
    const VERSION: u64 = PROTOCOL_VERSION as u64;

    fn body_len(&self) -> usize {
        wire::varint_len(Self::VERSION)
            + wire::varint_len(self.kind)
            + wire::bytes_len(self.job_id.as_bytes())
            + wire::varint_len(self.timestamp)
            + wire::varint_len(self.sequence)
            + wire::nested_len(self.payload_len)
    }

    /// The fields as prost writes them (in field order, defaults left out), up to the
    /// payload's key and length; the payload follows.
    fn put(&self, buf: &mut impl BufMut) {
        wire::put_varint(ipc_message::VERSION, Self::VERSION, buf);
        wire::put_varint(ipc_message::TYPE, self.kind, buf);
        wire::put_bytes(ipc_message::JOB_ID, self.job_id.as_bytes(), buf);
        wire::put_varint(ipc_message::TIMESTAMP, self.timestamp, buf);
        wire::put_varint(ipc_message::SEQUENCE, self.sequence, buf);
        if self.payload_len > 0 {
            wire::put_nested_key(ipc_message::DATA, self.payload_len, buf);
        }
    }
}

impl<'a> Frame<'a> {
    /// One log line (`partial`: no newline followed it; see `LogData`).
    pub fn log(
        job_id: &'a str,
        sequence: u64,
        timestamp_ns: i64,
        stream: Stream,
        content: &'a [u8],
        partial: bool,
    ) -> Frame<'a> {
        let stream = i64::from(stream as i32) as u64;
        let envelope = Fields {
            kind: MessageType::Log as u64,
            job_id,
            timestamp: timestamp_ns as u64,
            sequence,
            payload_len: wire::varint_len(stream)
                + wire::bytes_len(content)
                + wire::varint_len(u64::from(partial)),
        };
        Frame {
            body_len: envelope.body_len(),
            body: Body::Log {
                envelope,
                stream,
                content,
                partial,
            },
        }
    }

    /// One metric sample.
    pub fn metric(
        job_id: &'a str,
        sequence: u64,
        timestamp_ns: i64,
        sample: &'a MetricData,
    ) -> Frame<'a> {
        let envelope = Fields {
            kind: MessageType::Metric as u64,
            job_id,
            timestamp: timestamp_ns as u64,
            sequence,
            payload_len: sample.encoded_len(),
        };
        Frame {
            body_len: envelope.body_len(),
            body: Body::Metric { envelope, sample },
        }
    }

    /// Length of the encoded `IPCMessage`, without the prefix (what a receiver checks against
    /// its maximum frame size).
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Appends the frame to `buf`, byte for byte what [`crate::codec::encode_frame`] writes
    /// for the same message.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(LENGTH_PREFIX_BYTES + self.body_len);
        // A body over 4 GiB is refused by every sender before it is encoded.
        buf.put_u32(u32::try_from(self.body_len).unwrap_or(u32::MAX));
        match self.body {
            Body::Log {
                envelope,
                stream,
                content,
                partial,
            } => {
                envelope.put(buf);
                wire::put_varint(log_data::STREAM, stream, buf);
                wire::put_bytes(log_data::CONTENT, content, buf);
                wire::put_varint(log_data::PARTIAL, u64::from(partial), buf);
            }
            Body::Metric { envelope, sample } => {
                envelope.put(buf);
                sample.encode_raw(buf);
            }
            Body::Message(message) => message.encode_raw(buf),
        }
    }

    /// The encoded frame, on its own.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }
}

impl<'a> From<&'a IpcMessage> for Frame<'a> {
    fn from(message: &'a IpcMessage) -> Frame<'a> {
        Frame {
            body_len: message.encoded_len(),
            body: Body::Message(message),
        }
    }
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
        ..Default::default()
    };
    log_envelope(job_id, sequence, timestamp_ns, &data)
}

fn log_envelope(job_id: &str, sequence: u64, timestamp_ns: i64, data: &LogData) -> IpcMessage {
    envelope(
        MessageType::Log,
        job_id,
        sequence,
        timestamp_ns,
        data.encode_to_vec().into(),
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
        sample.encode_to_vec().into(),
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

/// A gap marker: the message stands for `lost_lines` lines that could not be replicated, at
/// its sequence (see `LogData` in ipc.proto).
pub fn gap_message(
    job_id: &str,
    sequence: u64,
    timestamp_ns: i64,
    stream: Stream,
    lost_lines: u64,
    reason: &str,
) -> IpcMessage {
    let data = LogData {
        stream: stream as i32,
        content: Bytes::new(),
        lost_lines,
        lost_reason: reason.to_owned(),
        partial: false,
    };
    log_envelope(job_id, sequence, timestamp_ns, &data)
}

/// An encoded `LogData`, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogPayload<'a> {
    /// As sent: possibly not a known `Stream` value.
    pub stream: i32,
    pub content: &'a [u8],
    /// Non-zero for a gap marker: this many lines were lost here.
    pub lost_lines: u64,
    /// Why, for a gap marker (UTF-8 as sent; prost would refuse what is not).
    pub lost_reason: &'a str,
    /// No newline followed the content.
    pub partial: bool,
}

/// The fields of an encoded `LogData`. Accepts and refuses exactly what `LogData::decode` does;
/// what senders write is read directly, anything else with prost's own field decoders.
pub fn log_payload(buf: &[u8]) -> Result<LogPayload<'_>, prost::DecodeError> {
    // As senders write it (fields in order, each at most once) it is read straight through;
    // anything else by prost's decoders.
    let canonical = || {
        let mut rest = buf;
        let mut payload = LogPayload::default();
        if next_is(log_data::STREAM, &mut rest) {
            payload.stream = read_varint(&mut rest)? as i32;
        }
        if next_is(log_data::CONTENT, &mut rest) {
            payload.content = read_bytes(&mut rest)?;
        }
        if next_is(log_data::LOST_LINES, &mut rest) {
            payload.lost_lines = read_varint(&mut rest)?;
        }
        if next_is(log_data::LOST_REASON, &mut rest) {
            payload.lost_reason = std::str::from_utf8(read_bytes(&mut rest)?).ok()?;
        }
        if next_is(log_data::PARTIAL, &mut rest) {
            // prost reads any varint as a bool, non-zero as true.
            payload.partial = read_varint(&mut rest)? != 0;
        }
        rest.is_empty().then_some(payload)
    };
    match canonical() {
        Some(read) => Ok(read),
        None => log_payload_any(buf),
    }
}

fn log_payload_any(mut buf: &[u8]) -> Result<LogPayload<'_>, prost::DecodeError> {
    use prost::encoding::{DecodeContext, bool, decode_key, int32, skip_field, string, uint64};
    let mut payload = LogPayload::default();
    let context = DecodeContext::default;
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match tag {
            1 => int32::merge(wire_type, &mut payload.stream, &mut buf, context())?,
            2 => payload.content = length_delimited(wire_type, tag, &mut buf)?,
            3 => uint64::merge(wire_type, &mut payload.lost_lines, &mut buf, context())?,
            4 => {
                // Borrowed, then checked by prost's own decoder (for its error).
                let mut field = buf;
                let bytes = length_delimited(wire_type, tag, &mut field)?;
                string::merge(wire_type, &mut String::new(), &mut buf, context())?;
                payload.lost_reason = std::str::from_utf8(bytes).unwrap_or_default();
            }
            5 => bool::merge(wire_type, &mut payload.partial, &mut buf, context())?,
            _ => skip_field(wire_type, tag, &mut buf, context())?,
        }
    }
    Ok(payload)
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

#[cfg(test)]
pub(crate) mod test_support {
    /// Protobuf-like bytes for property tests of decoders: up to `max_fields` fields with tags in
    /// `tags` and any wire type (mostly varint and length-delimited), well or badly formed,
    /// sometimes cut short, plus plain garbage.
    pub fn protobuf_like(
        tags: std::ops::Range<u64>,
        max_fields: usize,
    ) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let field = (
            tags,
            prop_oneof![Just(0u64), Just(2u64), 0u64..8],
            any::<u64>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                "[a-z0-9-]{0,12}".prop_map(String::into_bytes)
            ],
        )
            .prop_map(|(tag, wire_type, number, bytes)| {
                let mut out = Vec::new();
                prost::encoding::encode_varint(tag << 3 | wire_type, &mut out);
                match wire_type {
                    0 => prost::encoding::encode_varint(number, &mut out),
                    2 => {
                        prost::encoding::encode_varint(bytes.len() as u64, &mut out);
                        out.extend_from_slice(&bytes);
                    }
                    _ => out.extend_from_slice(&bytes[..bytes.len().min(8)]),
                }
                out
            });
        let fields = (
            prop::collection::vec(field, 0..max_fields),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(fields, cut)| {
                let all = fields.concat();
                let keep = if cut.index(4) == 0 {
                    cut.index(all.len() + 1)
                } else {
                    all.len()
                };
                all[..keep].to_vec()
            });
        prop_oneof![fields, prop::collection::vec(any::<u8>(), 0..60)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(message: &IpcMessage) -> Vec<u8> {
        let mut buf = BytesMut::new();
        crate::codec::encode_frame(message, usize::MAX >> 33, &mut buf).unwrap();
        buf.to_vec()
    }

    proptest! {
        /// Frames built from borrowed data are byte for byte what prost writes.
        #[test]
        fn frames_are_what_prost_encodes(
            job_id in ".{0,40}",
            sequence in prop_oneof![Just(0u64), any::<u64>()],
            timestamp in prop_oneof![Just(0i64), any::<i64>()],
            stream in 0i32..3,
            content in prop::collection::vec(any::<u8>(), 0..300),
            memory in any::<i64>(),
            partial in any::<bool>(),
        ) {
            let stream = Stream::try_from(stream).unwrap();
            let mut log = log_message(&job_id, sequence, timestamp, stream, content.clone().into());
            if partial {
                let data = LogData { stream: stream as i32, content: content.clone().into(), partial, ..Default::default() };
                log.data = data.encode_to_vec().into();
            }
            let frame = Frame::log(&job_id, sequence, timestamp, stream, &content, partial);
            prop_assert_eq!(frame.to_bytes().to_vec(), framed(&log));
            prop_assert_eq!(Frame::from(&log).to_bytes().to_vec(), framed(&log));
            prop_assert_eq!(frame.body_len(), log.encoded_len());

            let sample = MetricData { memory_bytes: memory, cpu_percent: 1.5, ..Default::default() };
            let metric = metric_message(&job_id, sequence, timestamp, &sample);
            let frame = Frame::metric(&job_id, sequence, timestamp, &sample);
            prop_assert_eq!(frame.to_bytes().to_vec(), framed(&metric));
            prop_assert_eq!(frame.body_len(), metric.encoded_len());
        }

        #[test]
        fn log_payload_reads_what_prost_reads(bytes in test_support::protobuf_like(1..7, 6)) {
            let ours = log_payload(&bytes);
            match LogData::decode(bytes.as_slice()) {
                Ok(data) => {
                    let ours = ours.expect("prost accepted it");
                    prop_assert_eq!(ours.stream, data.stream);
                    prop_assert_eq!(ours.content, data.content.as_ref());
                    prop_assert_eq!(ours.lost_lines, data.lost_lines);
                    prop_assert_eq!(ours.lost_reason, data.lost_reason.as_str());
                    prop_assert_eq!(ours.partial, data.partial);
                }
                Err(_) => prop_assert!(ours.is_err(), "prost refused it, we read {:?}", ours),
            }
        }
    }

    #[test]
    fn log_payload_of_an_encoded_line() {
        let message = log_message("job", 1, 2, Stream::Stderr, Bytes::from_static(b"\xffline"));
        let payload = log_payload(&message.data).unwrap();
        assert_eq!(payload.stream, Stream::Stderr as i32);
        assert_eq!(payload.content, b"\xffline");
        assert_eq!(payload.lost_lines, 0);
        let gap = gap_message("job", 2, 3, Stream::Stdout, 7, "too large");
        let payload = log_payload(&gap.data).unwrap();
        assert_eq!((payload.lost_lines, payload.lost_reason), (7, "too large"));
        assert!(payload.content.is_empty());
    }
}

/// Now, as the nanoseconds since the Unix epoch that every record carries.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
