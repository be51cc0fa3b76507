//! Building and checking the envelopes that travel on the replication stream.

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use joblet_proto::ipc::{IpcMessage, LogData, MessageType, MetricData, Stream};
use joblet_proto::wire;
use prost::Message;
use prost::encoding::encoded_len_varint;

use crate::codec::LENGTH_PREFIX_BYTES;

/// Frames and payloads are encoded one after another into a per-thread buffer of this size
/// and split off it: many messages share one allocation instead of one each.
const ARENA_BYTES: usize = 256 * 1024;

thread_local! {
    static ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `len` bytes written by `write` into the arena, as one `Bytes`.
fn in_arena(len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    ARENA.with_borrow_mut(|arena| {
        if arena.capacity() - arena.len() < len {
            *arena = BytesMut::with_capacity(ARENA_BYTES.max(len));
        }
        write(arena);
        arena.split().freeze()
    })
}

fn encode_payload(message: &impl Message) -> Bytes {
    // Room is made first, so the unchecked encoding cannot run out of space.
    in_arena(message.encoded_len(), |arena| message.encode_raw(arena))
}

/// One frame of the replication stream, encoded and ready to write: the length prefix and an
/// `IPCMessage`. Built straight from borrowed data on the sender's hot path (no `IpcMessage`,
/// no allocation of its own), or from an [`IpcMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    /// The frame of one log line.
    pub fn log(
        job_id: &str,
        sequence: u64,
        timestamp_ns: i64,
        stream: Stream,
        content: &[u8],
    ) -> Frame {
        // Enums are encoded as int32: sign-extended to 64 bits, as prost does.
        let stream = i64::from(stream as i32) as u64;
        let payload_len = wire::varint_field_len(stream) + wire::bytes_field_len(content);
        Frame::envelope(
            MessageType::Log,
            job_id,
            sequence,
            timestamp_ns,
            payload_len,
            |buf| {
                wire::put_varint_field(1, stream, buf);
                wire::put_bytes_field(2, content, buf);
            },
        )
    }

    /// The frame of one metric sample.
    pub fn metric(job_id: &str, sequence: u64, timestamp_ns: i64, sample: &MetricData) -> Frame {
        Frame::envelope(
            MessageType::Metric,
            job_id,
            sequence,
            timestamp_ns,
            sample.encoded_len(),
            |buf| sample.encode_raw(buf),
        )
    }

    /// Writes the envelope fields as prost does (in field order, defaults left out), with a
    /// payload of `payload_len` bytes that `payload` writes.
    fn envelope(
        kind: MessageType,
        job_id: &str,
        sequence: u64,
        timestamp_ns: i64,
        payload_len: usize,
        payload: impl FnOnce(&mut BytesMut),
    ) -> Frame {
        let (version, kind, timestamp) = (
            u64::from(PROTOCOL_VERSION),
            i64::from(kind as i32) as u64,
            timestamp_ns as u64,
        );
        let data_len = if payload_len == 0 {
            0
        } else {
            1 + encoded_len_varint(payload_len as u64) + payload_len
        };
        let body_len = wire::varint_field_len(version)
            + wire::varint_field_len(kind)
            + wire::bytes_field_len(job_id.as_bytes())
            + wire::varint_field_len(timestamp)
            + wire::varint_field_len(sequence)
            + data_len;
        Frame(in_arena(LENGTH_PREFIX_BYTES + body_len, |buf| {
            // A body over 4 GiB is refused by every sender before it is written.
            buf.put_u32(u32::try_from(body_len).unwrap_or(u32::MAX));
            wire::put_varint_field(1, version, buf);
            wire::put_varint_field(2, kind, buf);
            wire::put_bytes_field(3, job_id.as_bytes(), buf);
            wire::put_varint_field(4, timestamp, buf);
            wire::put_varint_field(5, sequence, buf);
            if payload_len > 0 {
                wire::put_length_delimited_key(6, payload_len, buf);
                payload(buf);
            }
        }))
    }

    /// The frame's bytes, length prefix included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length of the `IPCMessage`, without the prefix (what a receiver checks against its
    /// maximum frame size).
    pub fn body_len(&self) -> usize {
        self.0.len() - LENGTH_PREFIX_BYTES
    }
}

impl From<&IpcMessage> for Frame {
    fn from(message: &IpcMessage) -> Frame {
        let len = message.encoded_len();
        Frame(in_arena(LENGTH_PREFIX_BYTES + len, |buf| {
            buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
            message.encode_raw(buf);
        }))
    }
}

impl From<IpcMessage> for Frame {
    fn from(message: IpcMessage) -> Frame {
        Frame::from(&message)
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

/// The fields of an encoded `LogData`, borrowed from it: the stream (as sent, possibly not a
/// known `Stream` value) and the content. Accepts and refuses exactly what `LogData::decode`
/// does; what senders write is read directly, anything else with prost's own field decoders.
pub fn log_payload(buf: &[u8]) -> Result<(i32, &[u8]), prost::DecodeError> {
    // As senders write it (stream, then content, each at most once) it is read straight
    // through; anything else by prost's decoders.
    let canonical = || {
        let mut rest = buf;
        let mut stream = 0;
        if next_is(0x08, &mut rest) {
            stream = varint(&mut rest)? as i32;
        }
        let mut content: &[u8] = &[];
        if next_is(0x12, &mut rest) {
            content = field(&mut rest)?;
        }
        rest.is_empty().then_some((stream, content))
    };
    match canonical() {
        Some(read) => Ok(read),
        None => log_payload_any(buf),
    }
}

fn log_payload_any(mut buf: &[u8]) -> Result<(i32, &[u8]), prost::DecodeError> {
    use prost::encoding::{DecodeContext, decode_key, int32, skip_field};
    let (mut stream, mut content): (i32, &[u8]) = (0, &[]);
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match tag {
            1 => int32::merge(wire_type, &mut stream, &mut buf, DecodeContext::default())?,
            2 => content = length_delimited(wire_type, tag, &mut buf)?,
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok((stream, content))
}

/// A varint that fits in 64 bits, as prost reads it; `None` for anything else, which
/// the general decoder then refuses.
#[inline]
pub(crate) fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            // The tenth byte holds the 64th bit only.
            if i == 9 && byte > 1 {
                return None;
            }
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

/// A length-delimited field's content, when it is all there.
#[inline]
pub(crate) fn field<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut rest = *buf;
    let len = usize::try_from(varint(&mut rest)?).ok()?;
    let (content, rest) = rest.split_at_checked(len)?;
    *buf = rest;
    Some(content)
}

/// Whether `buf` starts with the one-byte `key`; if so, moves past it.
#[inline]
pub(crate) fn next_is(key: u8, buf: &mut &[u8]) -> bool {
    let here = buf.first() == Some(&key);
    if here {
        *buf = &buf[1..];
    }
    here
}

/// The content of a length-delimited field whose key was just read from `buf`, borrowed, with
/// the checks prost's own decoders make; `buf` moves past the field.
pub(crate) fn length_delimited<'a>(
    wire_type: prost::encoding::WireType,
    tag: u32,
    buf: &mut &'a [u8],
) -> Result<&'a [u8], prost::DecodeError> {
    use prost::encoding::{DecodeContext, WireType, check_wire_type, decode_varint, skip_field};
    check_wire_type(WireType::LengthDelimited, wire_type)?;
    // Skipping checks the length against what is left; the field is then its length prefix
    // followed by the content.
    let mut rest = *buf;
    skip_field(wire_type, tag, &mut rest, DecodeContext::default())?;
    let mut field = &buf[..buf.len() - rest.len()];
    decode_varint(&mut field)?;
    *buf = rest;
    Ok(field)
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Payload-like bytes: fields with tags 1 to 4 and any wire type, well or badly formed,
    /// sometimes cut short, plus plain garbage.
    fn payload_bytes() -> impl Strategy<Value = Vec<u8>> {
        let field = (
            1u64..5,
            0u64..8,
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..40),
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
            prop::collection::vec(field, 0..6),
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
        ) {
            let stream = Stream::try_from(stream).unwrap();
            let log = log_message(&job_id, sequence, timestamp, stream, content.clone().into());
            let frame = Frame::log(&job_id, sequence, timestamp, stream, &content);
            prop_assert_eq!(frame.as_bytes().to_vec(), framed(&log));
            prop_assert_eq!(&frame, &Frame::from(&log));
            prop_assert_eq!(frame.body_len(), log.encoded_len());

            let sample = MetricData { memory_bytes: memory, cpu_percent: 1.5, ..Default::default() };
            let metric = metric_message(&job_id, sequence, timestamp, &sample);
            let frame = Frame::metric(&job_id, sequence, timestamp, &sample);
            prop_assert_eq!(frame.as_bytes().to_vec(), framed(&metric));
        }

        #[test]
        fn log_payload_reads_what_prost_reads(bytes in payload_bytes()) {
            let ours = log_payload(&bytes);
            match LogData::decode(bytes.as_slice()) {
                Ok(data) => {
                    let (stream, content) = ours.expect("prost accepted it");
                    prop_assert_eq!(stream, data.stream);
                    prop_assert_eq!(content, data.content.as_ref());
                }
                Err(_) => prop_assert!(ours.is_err(), "prost refused it, we read {:?}", ours),
            }
        }
    }

    #[test]
    fn log_payload_of_an_encoded_line() {
        let message = log_message("job", 1, 2, Stream::Stderr, Bytes::from_static(b"\xffline"));
        let (stream, content) = log_payload(&message.data).unwrap();
        assert_eq!(stream, Stream::Stderr as i32);
        assert_eq!(content, b"\xffline");
    }

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
