//! Received messages, read in place.
//!
//! The receiver keeps what it read from the socket as it arrived: runs of whole, valid frames,
//! each run one [`Bytes`] sharing the read buffer. It does not decode one struct per message;
//! [`Batch::iter`] reads the envelopes where they are used. Between the socket and the store a
//! message therefore costs no allocation, no copy and no reference count of its own, which
//! matters at a million lines per second on two cores.

use bytes::{Buf, Bytes, BytesMut};
use joblet_proto::ipc::{IpcMessage, MessageType};

use crate::codec::{DEFAULT_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES, encode_frame};
use crate::message::{InvalidMessage, PROTOCOL_VERSION};
use joblet_proto::wire::{
    ipc_message, length_delimited, log_data, next_is, read_bytes, read_varint,
};

/// An `IPCMessage` read in place: the fields borrow the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub version: u32,
    /// The message type as sent (see [`Envelope::kind`]).
    pub r#type: i32,
    pub job_id: &'a str,
    pub timestamp: i64,
    pub sequence: u64,
    pub data: &'a [u8],
}

/// What [`Envelope::read_head`] reads of a frame too large to read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    pub envelope: Envelope<'a>,
    /// For a log line, its stream as sent (0 when not read).
    pub stream: i32,
}

/// Why a frame's body is not an `IPCMessage`.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
    #[error("job_id is not UTF-8")]
    JobIdUtf8,
}

impl<'a> Envelope<'a> {
    /// Reads an encoded `IPCMessage`. Accepts and refuses exactly what `IpcMessage::decode`
    /// does and reads the same values.
    pub fn read(buf: &'a [u8]) -> Result<Envelope<'a>, EnvelopeError> {
        match Envelope::read_canonical(buf) {
            Some(envelope) => Ok(envelope),
            None => Envelope::read_any(buf),
        }
    }

    /// The envelope as senders write it: known fields in field order, each at most once.
    /// Read straight through; `None` for anything else.
    #[inline]
    fn read_canonical(mut buf: &'a [u8]) -> Option<Envelope<'a>> {
        let mut envelope = Envelope::read_leading_fields(&mut buf)?;
        if next_is(ipc_message::DATA, &mut buf) {
            envelope.data = read_bytes(&mut buf)?;
        }
        buf.is_empty().then_some(envelope)
    }

    /// Any encoding, with prost's own field decoders.
    fn read_any(mut buf: &'a [u8]) -> Result<Envelope<'a>, EnvelopeError> {
        use prost::encoding::{
            DecodeContext, decode_key, int32, int64, skip_field, uint32, uint64,
        };
        let mut envelope = Envelope::EMPTY;
        let context = DecodeContext::default;
        while !buf.is_empty() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            match tag {
                1 => uint32::merge(wire_type, &mut envelope.version, &mut buf, context())?,
                2 => int32::merge(wire_type, &mut envelope.r#type, &mut buf, context())?,
                3 => {
                    let bytes = length_delimited(wire_type, tag, &mut buf)?;
                    envelope.job_id =
                        std::str::from_utf8(bytes).map_err(|_| EnvelopeError::JobIdUtf8)?;
                }
                4 => int64::merge(wire_type, &mut envelope.timestamp, &mut buf, context())?,
                5 => uint64::merge(wire_type, &mut envelope.sequence, &mut buf, context())?,
                6 => envelope.data = length_delimited(wire_type, tag, &mut buf)?,
                _ => skip_field(wire_type, tag, &mut buf, context())?,
            }
        }
        Ok(envelope)
    }

    /// The envelope fields at the start of a frame's body cut short (a frame too large to be
    /// read whole), as senders write them: fields 1 to 5 in order, then the data field's key
    /// and length, then for a log line its stream. `data` is left empty. `None` when the head
    /// does not hold them.
    pub fn read_head(mut buf: &'a [u8]) -> Option<Head<'a>> {
        let envelope = Envelope::read_leading_fields(&mut buf)?;
        let mut stream = 0;
        if next_is(ipc_message::DATA, &mut buf) {
            read_varint(&mut buf)?;
            if next_is(log_data::STREAM, &mut buf) {
                stream = read_varint(&mut buf).unwrap_or_default() as i32;
            }
        }
        Some(Head { envelope, stream })
    }

    /// Fields 1 to 5 (all but the data), as senders write them: in field order, each at most
    /// once. Moves `buf` past them; `None` when one is cut short or malformed.
    #[inline]
    fn read_leading_fields(buf: &mut &'a [u8]) -> Option<Envelope<'a>> {
        let mut envelope = Envelope::EMPTY;
        if next_is(ipc_message::VERSION, buf) {
            envelope.version = read_varint(buf)? as u32;
        }
        if next_is(ipc_message::TYPE, buf) {
            envelope.r#type = read_varint(buf)? as i32;
        }
        if next_is(ipc_message::JOB_ID, buf) {
            envelope.job_id = std::str::from_utf8(read_bytes(buf)?).ok()?;
        }
        if next_is(ipc_message::TIMESTAMP, buf) {
            envelope.timestamp = read_varint(buf)? as i64;
        }
        if next_is(ipc_message::SEQUENCE, buf) {
            envelope.sequence = read_varint(buf)?;
        }
        Some(envelope)
    }

    const EMPTY: Envelope<'static> = Envelope {
        version: 0,
        r#type: 0,
        job_id: "",
        timestamp: 0,
        sequence: 0,
        data: &[],
    };

    /// Checks the fields a receiver relies on; the payload is checked by whoever reads it.
    pub fn validate(&self) -> Result<MessageType, InvalidMessage> {
        if self.version != PROTOCOL_VERSION {
            return Err(InvalidMessage::Version);
        }
        if self.job_id.is_empty() {
            return Err(InvalidMessage::EmptyJobId);
        }
        match MessageType::try_from(self.r#type) {
            Ok(kind @ (MessageType::Log | MessageType::Metric | MessageType::Job)) => Ok(kind),
            _ => Err(InvalidMessage::Type),
        }
    }

    /// The message type; `Unspecified` for a value that is not one.
    pub fn kind(&self) -> MessageType {
        MessageType::try_from(self.r#type).unwrap_or_default()
    }

    /// An owned copy, for tests and tools.
    pub fn to_message(&self) -> IpcMessage {
        IpcMessage {
            version: self.version,
            r#type: self.r#type,
            job_id: self.job_id.to_owned(),
            timestamp: self.timestamp,
            sequence: self.sequence,
            data: Bytes::copy_from_slice(self.data),
        }
    }
}

/// What [`scan`] found after the valid frames at the front of a buffer.
#[derive(Debug)]
pub enum Stop {
    /// The next frame is not complete: this many more bytes are needed at least.
    NeedMore(usize),
    /// The next frame (this many bytes with its prefix) is a well-formed envelope that
    /// [`Envelope::validate`] refuses: skip it alone.
    Invalid {
        frame_bytes: usize,
        why: InvalidMessage,
    },
    /// The next frame's length is over the maximum: the stream cannot be trusted further.
    Oversized { len: usize },
    /// The next frame's body is not an `IPCMessage`: the stream cannot be trusted further.
    Undecodable(EnvelopeError),
}

/// The valid frames at the front of `buf`: how many bytes and messages they take, and why the
/// run stopped there.
#[derive(Debug)]
pub struct Scan {
    pub bytes: usize,
    pub messages: usize,
    pub stop: Stop,
}

/// Reads frames from the front of `buf` while they are complete and valid, showing each valid
/// envelope to `seen`.
pub fn scan(buf: &[u8], max_frame_bytes: usize, mut seen: impl FnMut(&Envelope<'_>)) -> Scan {
    let (mut bytes, mut messages) = (0, 0);
    let stop = loop {
        let rest = &buf[bytes..];
        let Some(prefix) = rest.get(..LENGTH_PREFIX_BYTES) else {
            break Stop::NeedMore(LENGTH_PREFIX_BYTES - rest.len());
        };
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if len > max_frame_bytes {
            break Stop::Oversized { len };
        }
        let frame_bytes = LENGTH_PREFIX_BYTES + len;
        let Some(body) = rest.get(LENGTH_PREFIX_BYTES..frame_bytes) else {
            break Stop::NeedMore(frame_bytes - rest.len());
        };
        match Envelope::read(body) {
            Ok(envelope) => match envelope.validate() {
                Ok(_) => {
                    seen(&envelope);
                    bytes += frame_bytes;
                    messages += 1;
                }
                Err(why) => break Stop::Invalid { frame_bytes, why },
            },
            Err(error) => break Stop::Undecodable(error),
        }
    };
    Scan {
        bytes,
        messages,
        stop,
    }
}

/// Valid messages in the order they were received, handed to a
/// [`MessageSink`](crate::MessageSink) as one unit.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Each holds whole frames that [`scan`] accepted.
    runs: Vec<Bytes>,
    messages: usize,
}

impl Batch {
    /// Adds a run of frames that [`scan`] accepted (`messages` of them).
    pub(crate) fn push(&mut self, run: Bytes, messages: usize) {
        self.runs.push(run);
        self.messages += messages;
    }

    /// The messages of `messages` that a receiver accepts, framed as it keeps them; the
    /// others are left out, as the receiver leaves them out. For tests and tools.
    pub fn from_messages(messages: &[IpcMessage]) -> Batch {
        let mut batch = Batch::default();
        let mut frame = BytesMut::new();
        for message in messages {
            frame.clear();
            if encode_frame(message, DEFAULT_MAX_FRAME_BYTES, &mut frame).is_err() {
                continue;
            }
            let accepted = scan(&frame, DEFAULT_MAX_FRAME_BYTES, |_| {}).messages;
            if accepted == 1 {
                batch.push(Bytes::copy_from_slice(&frame), 1);
            }
        }
        batch
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Size of the frames, length prefixes included.
    pub fn frame_bytes(&self) -> usize {
        self.runs.iter().map(Bytes::len).sum()
    }

    /// The envelopes, in the order they were received.
    pub fn iter(&self) -> impl Iterator<Item = Envelope<'_>> {
        self.runs.iter().flat_map(|run| Frames { rest: run })
    }
}

/// The envelopes of a run of frames that [`scan`] accepted.
struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = Envelope<'a>;

    fn next(&mut self) -> Option<Envelope<'a>> {
        // The run was scanned whole when it was received, so every read here succeeds; should
        // one not, the run ends there rather than yielding something unchecked.
        if self.rest.remaining() < LENGTH_PREFIX_BYTES {
            return None;
        }
        let len = self.rest.get_u32() as usize;
        let (body, rest) = self.rest.split_at_checked(len)?;
        self.rest = rest;
        Envelope::read(body).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::test_support::protobuf_like;
    use crate::message::{log_message, metric_message};
    use joblet_proto::ipc::{MetricData, Stream};
    use proptest::prelude::*;
    use prost::Message;

    proptest! {
        #[test]
        fn envelopes_read_what_prost_decodes(bytes in protobuf_like(1..8, 8)) {
            let ours = Envelope::read(&bytes);
            match IpcMessage::decode(bytes.as_slice()) {
                Ok(message) => {
                    let envelope = ours.expect("prost accepted it");
                    prop_assert_eq!(envelope.to_message(), message);
                }
                Err(_) => prop_assert!(ours.is_err(), "prost refused it, we read {:?}", ours),
            }
        }

        /// Frames cut anywhere: the valid ones before the cut are taken whole, the cut one is
        /// waited for, and nothing is read past an invalid one.
        #[test]
        fn scan_takes_whole_valid_frames_only(
            kinds in prop::collection::vec(0u8..4, 0..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let messages: Vec<IpcMessage> = kinds.iter().enumerate().map(|(i, kind)| {
                let mut message = log_message("job", i as u64, 7, Stream::Stdout, "x".into());
                match kind {
                    0 => message.version = 2,
                    1 => message = metric_message("job", i as u64, 7, &MetricData::default()),
                    _ => {}
                }
                message
            }).collect();
            let mut wire = BytesMut::new();
            let mut ends = Vec::new();
            for message in &messages {
                encode_frame(message, DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
                ends.push(wire.len());
            }
            let cut = cut.index(wire.len() + 1);
            let result = scan(&wire[..cut], DEFAULT_MAX_FRAME_BYTES, |_| {});
            let whole = ends.iter().take_while(|end| **end <= cut).count();
            let valid = messages[..whole].iter().take_while(|m| m.version == 1).count();
            prop_assert_eq!(result.messages, valid);
            prop_assert_eq!(result.bytes, if valid == 0 { 0 } else { ends[valid - 1] });
            match result.stop {
                Stop::Invalid { frame_bytes, why } => {
                    prop_assert!(valid < whole);
                    prop_assert_eq!(why, InvalidMessage::Version);
                    prop_assert_eq!(result.bytes + frame_bytes, ends[valid]);
                }
                Stop::NeedMore(more) => {
                    prop_assert_eq!(valid, whole);
                    prop_assert!(more > 0 && cut + more <= ends.get(whole).copied().unwrap_or(cut + 4));
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }

    #[test]
    fn a_batch_iterates_the_valid_messages_in_order() {
        let mut messages: Vec<IpcMessage> = (1..=5)
            .map(|i| log_message("job", i, i as i64, Stream::Stderr, "\u{ff}line".into()))
            .collect();
        messages[2].job_id.clear();
        let batch = Batch::from_messages(&messages);
        assert_eq!(batch.len(), 4);
        let read: Vec<IpcMessage> = batch.iter().map(|e| e.to_message()).collect();
        messages.remove(2);
        assert_eq!(read, messages);
    }

    #[test]
    fn the_head_of_a_frame_cut_short_says_whose_line_it_is() {
        let message = log_message("job-7", 42, 99, Stream::Stderr, vec![b'x'; 5000].into());
        let mut wire = BytesMut::new();
        encode_frame(&message, usize::MAX >> 33, &mut wire).unwrap();
        for cut in [40, 4096] {
            let head = Envelope::read_head(&wire[LENGTH_PREFIX_BYTES..cut]).unwrap();
            assert_eq!(head.envelope.job_id, "job-7");
            assert_eq!((head.envelope.sequence, head.envelope.timestamp), (42, 99));
            assert_eq!(head.envelope.validate(), Ok(MessageType::Log));
            assert_eq!(head.stream, Stream::Stderr as i32);
        }
        // Cut inside the job id: it cannot say.
        assert!(Envelope::read_head(&wire[LENGTH_PREFIX_BYTES..LENGTH_PREFIX_BYTES + 6]).is_none());
    }

    #[test]
    fn oversized_and_undecodable_frames_stop_the_scan() {
        let mut wire = BytesMut::new();
        encode_frame(
            &log_message("job", 1, 1, Stream::Stdout, "a".into()),
            1024,
            &mut wire,
        )
        .unwrap();
        let valid = wire.len();
        wire.extend_from_slice(&2000u32.to_be_bytes());
        let result = scan(&wire, 1024, |_| {});
        assert_eq!((result.bytes, result.messages), (valid, 1));
        assert!(matches!(result.stop, Stop::Oversized { len: 2000 }));

        wire.truncate(valid);
        wire.extend_from_slice(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(
            scan(&wire, 1024, |_| {}).stop,
            Stop::Undecodable(_)
        ));
    }
}
