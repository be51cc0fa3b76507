//! Protobuf written and read by hand, in one place.
//!
//! The hot paths encode and read four messages without building structs: `joblet.LogRecord`
//! (core's spool), `joblet.ipc.IPCMessage` and `joblet.ipc.LogData` (every replicated line),
//! and `joblet.persist.LogLine` (every line a query returns). Their fields are named here, once,
//! as [`Field`]s whose keys are computed from number and wire type (a number that needs a longer
//! key than one byte does not compile); every writer and reader of them takes these names. The
//! suite at the bottom checks each against prost's generated code: what the writers write is
//! byte for byte what prost writes, and what the readers read is what prost decodes.
//!
//! Writers follow prost: fields in number order, a field at its default value left out. A
//! field's key and varint are put with one `put_slice`, not a byte at a time as
//! `prost::encoding::encode_varint` does. Readers read that layout straight through and say
//! `None` for anything else, which their callers then hand to prost's general decoders.

use bytes::BufMut;
use prost::encoding::encoded_len_varint;

const VARINT: u8 = 0;
const LENGTH_DELIMITED: u8 = 2;

/// A field of a hand-written message: its number and its one-byte key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    number: u32,
    key: u8,
}

impl Field {
    /// A varint field (integers, enums, bools). Numbers 1 to 15 only: their keys are one byte.
    pub const fn varint(number: u32) -> Field {
        Field::new(number, VARINT)
    }

    /// A length-delimited field (bytes, strings, nested messages). Numbers 1 to 15 only.
    pub const fn bytes(number: u32) -> Field {
        Field::new(number, LENGTH_DELIMITED)
    }

    const fn new(number: u32, wire_type: u8) -> Field {
        assert!(
            number >= 1 && number < 16,
            "a hand-written field needs a one-byte key: number 1 to 15"
        );
        Field {
            number,
            key: (number as u8) << 3 | wire_type,
        }
    }

    pub const fn number(self) -> u32 {
        self.number
    }

    /// The field's key as it is on the wire.
    pub const fn key(self) -> u8 {
        self.key
    }
}

/// `joblet.ipc.IPCMessage`, the envelope of every replicated message.
pub mod ipc_message {
    use super::Field;
    pub const VERSION: Field = Field::varint(1);
    pub const TYPE: Field = Field::varint(2);
    pub const JOB_ID: Field = Field::bytes(3);
    pub const TIMESTAMP: Field = Field::varint(4);
    pub const SEQUENCE: Field = Field::varint(5);
    pub const DATA: Field = Field::bytes(6);
}

/// `joblet.ipc.LogData`, the payload of a replicated line or gap marker.
pub mod log_data {
    use super::Field;
    pub const STREAM: Field = Field::varint(1);
    pub const CONTENT: Field = Field::bytes(2);
    pub const LOST_LINES: Field = Field::varint(3);
    pub const LOST_REASON: Field = Field::bytes(4);
    pub const PARTIAL: Field = Field::varint(5);
}

/// `joblet.LogRecord`, a record of core's spool and of StreamLogs.
pub mod log_record {
    use super::Field;
    pub const STREAM: Field = Field::varint(1);
    pub const TIMESTAMP: Field = Field::varint(2);
    pub const SEQUENCE: Field = Field::varint(3);
    pub const CONTENT: Field = Field::bytes(4);
    pub const PARTIAL: Field = Field::varint(5);

    /// The fields of a record, borrowed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Record<'a> {
        pub stream: i32,
        pub timestamp: i64,
        pub sequence: u64,
        pub content: &'a [u8],
        pub partial: bool,
    }

    impl Record<'_> {
        fn varints(&self) -> [(Field, u64); 3] {
            [
                (STREAM, self.stream as u64),
                (TIMESTAMP, self.timestamp as u64),
                (SEQUENCE, self.sequence),
            ]
        }

        /// Length of the encoded record.
        pub fn encoded_len(&self) -> usize {
            super::varints_len(&self.varints())
                + super::bytes_len(self.content)
                + super::varint_len(u64::from(self.partial))
        }

        /// Appends the record as prost encodes it.
        pub fn encode(&self, buf: &mut impl bytes::BufMut) {
            super::put_varints(&self.varints(), buf);
            super::put_bytes(CONTENT, self.content, buf);
            super::put_varint(PARTIAL, u64::from(self.partial), buf);
        }
    }

    /// The sequence of an encoded record, read without decoding the rest: records as
    /// [`Record::encode`] writes them straight through, any other layout by prost's decoders.
    pub fn sequence(body: &[u8]) -> Result<u64, prost::DecodeError> {
        let canonical = || {
            let mut rest = body;
            for field in [STREAM, TIMESTAMP] {
                if super::next_is(field, &mut rest) {
                    super::read_varint(&mut rest)?;
                }
            }
            if super::next_is(SEQUENCE, &mut rest) {
                return super::read_varint(&mut rest);
            }
            // No sequence field: the record's sequence is 0, if the next field is the content.
            (rest.is_empty() || rest[0] == CONTENT.key()).then_some(0)
        };
        match canonical() {
            Some(sequence) => Ok(sequence),
            None => super::varint_field(body, SEQUENCE),
        }
    }
}

/// `joblet.persist.LogLine`, a line of a QueryLogs answer.
pub mod log_line {
    use super::Field;
    pub const JOB_ID: Field = Field::bytes(1);
    pub const STREAM: Field = Field::varint(2);
    pub const TIMESTAMP: Field = Field::varint(3);
    pub const SEQUENCE: Field = Field::varint(4);
    pub const CONTENT: Field = Field::bytes(5);
    pub const LOST_LINES: Field = Field::varint(10);
    pub const LOST_REASON: Field = Field::bytes(11);
    pub const PARTIAL: Field = Field::varint(12);

    /// The fields of a line after its job id, borrowed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Line<'a> {
        pub stream: i32,
        pub timestamp: i64,
        pub sequence: u64,
        pub content: &'a [u8],
        pub lost_lines: u64,
        pub lost_reason: &'a [u8],
        pub partial: bool,
    }

    impl Line<'_> {
        fn varints(&self) -> [(Field, u64); 3] {
            [
                (STREAM, self.stream as u64),
                (TIMESTAMP, self.timestamp as u64),
                (SEQUENCE, self.sequence),
            ]
        }

        /// Length of the encoded line after `job_id_field` (see [`job_id_field`]).
        pub fn encoded_len(&self) -> usize {
            super::varints_len(&self.varints())
                + super::bytes_len(self.content)
                + super::varint_len(self.lost_lines)
                + super::bytes_len(self.lost_reason)
                + super::varint_len(u64::from(self.partial))
        }

        /// Appends the line as prost encodes it, its job id field (the same for every line of
        /// a query: encoded once by [`job_id_field`]) first.
        pub fn encode(&self, job_id_field: &[u8], buf: &mut impl bytes::BufMut) {
            buf.put_slice(job_id_field);
            super::put_varints(&self.varints(), buf);
            super::put_bytes(CONTENT, self.content, buf);
            super::put_varint(LOST_LINES, self.lost_lines, buf);
            super::put_bytes(LOST_REASON, self.lost_reason, buf);
            super::put_varint(PARTIAL, u64::from(self.partial), buf);
        }
    }

    /// The encoded job id field of a query's lines.
    pub fn job_id_field(job_id: &str) -> Vec<u8> {
        let mut field = Vec::with_capacity(job_id.len() + 6);
        super::put_bytes(JOB_ID, job_id.as_bytes(), &mut field);
        field
    }
}

/// Encoded length of varint fields.
fn varints_len(fields: &[(Field, u64)]) -> usize {
    fields.iter().map(|&(_, value)| varint_len(value)).sum()
}

/// Puts varint fields in the order given.
fn put_varints(fields: &[(Field, u64)], buf: &mut impl BufMut) {
    for &(field, value) in fields {
        put_varint(field, value, buf);
    }
}

/// Encoded length of a varint field (0 for 0: left out).
pub fn varint_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

/// Encoded length of a bytes (or string) field (0 when empty: left out).
pub fn bytes_len(bytes: &[u8]) -> usize {
    nested_len(bytes.len())
}

/// Encoded length of a length-delimited field of `len` bytes (0 when empty: left out).
pub fn nested_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    }
}

/// Puts a varint field, unless `value` is 0.
pub fn put_varint(field: Field, value: u64, buf: &mut impl BufMut) {
    debug_assert_eq!(field.key & 7, VARINT, "{field:?} is not a varint");
    if value != 0 {
        put_key_and_varint(field.key, value, buf);
    }
}

/// Puts a bytes (or string) field, unless `bytes` is empty.
pub fn put_bytes(field: Field, bytes: &[u8], buf: &mut impl BufMut) {
    if !bytes.is_empty() {
        put_nested_key(field, bytes.len(), buf);
        buf.put_slice(bytes);
    }
}

/// The key and length of a length-delimited field (a nested message) of `len` bytes, which
/// the caller writes next.
pub fn put_nested_key(field: Field, len: usize, buf: &mut impl BufMut) {
    debug_assert_eq!(
        field.key & 7,
        LENGTH_DELIMITED,
        "{field:?} is not length-delimited"
    );
    put_key_and_varint(field.key, len as u64, buf);
}

/// Puts `key` and the varint `value` with one `put_slice`.
#[inline]
fn put_key_and_varint(key: u8, mut value: u64, buf: &mut impl BufMut) {
    let mut bytes = [0u8; 11];
    bytes[0] = key;
    let mut len = 1;
    while value >= 0x80 {
        bytes[len] = value as u8 | 0x80;
        value >>= 7;
        len += 1;
    }
    bytes[len] = value as u8;
    buf.put_slice(&bytes[..=len]);
}

/// Whether `buf` starts with `field`'s key; if so, moves past it.
#[inline]
pub fn next_is(field: Field, buf: &mut &[u8]) -> bool {
    let here = buf.first() == Some(&field.key);
    if here {
        *buf = &buf[1..];
    }
    here
}

/// A varint that fits in 64 bits, as prost reads it; `None` for anything else (which prost's
/// decoder then refuses).
#[inline]
pub fn read_varint(buf: &mut &[u8]) -> Option<u64> {
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
pub fn read_bytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut rest = *buf;
    let len = usize::try_from(read_varint(&mut rest)?).ok()?;
    let (content, rest) = rest.split_at_checked(len)?;
    *buf = rest;
    Some(content)
}

/// The content of a length-delimited field whose key was just read from `buf` by prost's
/// `decode_key`, borrowed, with the checks prost's own decoders make; `buf` moves past it.
pub fn length_delimited<'a>(
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

/// The value of varint `field` of an encoded message (0 when absent, as proto3 reads it), read
/// up to its first occurrence: the fields before it are skipped without decoding, those after
/// it (a record's content, say) not even looked at. Meant for messages whose writers put the
/// field once, as ours do.
pub fn varint_field(mut message: &[u8], field: Field) -> Result<u64, prost::DecodeError> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    while !message.is_empty() {
        let (number, wire_type) = decode_key(&mut message)?;
        if number == field.number && wire_type == WireType::Varint {
            return decode_varint(&mut message);
        }
        skip_field(wire_type, number, &mut message, DecodeContext::default())?;
    }
    Ok(0)
}

/// The prost-equivalence suite of every hand-written message: the writers against prost's
/// encoder, the readers against its decoder.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ipc, joblet, persist};
    use bytes::Bytes;
    use proptest::prelude::*;
    use prost::Message;

    /// Integers that cross every varint length, and their extremes.
    fn int() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            0u64..300,
            (0u32..64).prop_map(|shift| 1u64 << shift),
            any::<u64>()
        ]
    }

    fn content() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![Just(Vec::new()), any::<Vec<u8>>(), Just(vec![b'x'; 20_000])]
    }

    proptest! {
        #[test]
        fn a_log_record_is_written_and_read_as_prost_does(
            stream in -3i32..4, timestamp in int(), sequence in int(), content in content(),
            partial in any::<bool>(),
        ) {
            let record = log_record::Record {
                stream, timestamp: timestamp as i64, sequence, content: &content, partial,
            };
            let mut ours = Vec::new();
            record.encode(&mut ours);
            let prost = joblet::LogRecord {
                stream, timestamp: timestamp as i64, sequence,
                content: Bytes::from(content.clone()), partial,
            }.encode_to_vec();
            prop_assert_eq!(&ours, &prost);
            prop_assert_eq!(record.encoded_len(), prost.len());
            prop_assert_eq!(log_record::sequence(&prost), Ok(sequence));
        }

        #[test]
        fn a_log_line_is_written_as_prost_does(
            job_id in "\\PC{0,40}", stream in 0i32..3, timestamp in int(), sequence in int(),
            content in content(), lost_lines in int(), lost_reason in "\\PC{0,20}",
            partial in any::<bool>(),
        ) {
            let line = log_line::Line {
                stream, timestamp: timestamp as i64, sequence, content: &content, lost_lines,
                lost_reason: lost_reason.as_bytes(), partial,
            };
            let job_id_field = log_line::job_id_field(&job_id);
            let mut ours = Vec::new();
            line.encode(&job_id_field, &mut ours);
            let prost = persist::LogLine {
                job_id: job_id.clone(), stream, timestamp: timestamp as i64, sequence,
                content: content.clone().into(), lost_lines, lost_reason: lost_reason.clone(),
                partial,
            }.encode_to_vec();
            prop_assert_eq!(&ours, &prost);
            prop_assert_eq!(job_id_field.len() + line.encoded_len(), prost.len());
        }

        #[test]
        fn envelope_and_log_data_fields_are_prost_s(
            version in int(), kind in 0i32..4, job_id in "\\PC{0,40}", timestamp in int(),
            sequence in int(), stream in 0i32..3, content in content(), lost_lines in int(),
            lost_reason in "\\PC{0,20}", partial in any::<bool>(),
        ) {
            let data = ipc::LogData {
                stream, content: content.clone().into(), lost_lines,
                lost_reason: lost_reason.clone(), partial,
            };
            let mut payload = Vec::new();
            put_varint(log_data::STREAM, stream as u64, &mut payload);
            put_bytes(log_data::CONTENT, &content, &mut payload);
            put_varint(log_data::LOST_LINES, lost_lines, &mut payload);
            put_bytes(log_data::LOST_REASON, lost_reason.as_bytes(), &mut payload);
            put_varint(log_data::PARTIAL, u64::from(partial), &mut payload);
            prop_assert_eq!(&payload, &data.encode_to_vec());

            let version = version as u32;
            let mut ours = Vec::new();
            put_varint(ipc_message::VERSION, u64::from(version), &mut ours);
            put_varint(ipc_message::TYPE, kind as u64, &mut ours);
            put_bytes(ipc_message::JOB_ID, job_id.as_bytes(), &mut ours);
            put_varint(ipc_message::TIMESTAMP, timestamp, &mut ours);
            put_varint(ipc_message::SEQUENCE, sequence, &mut ours);
            let head = ours.len();
            if !payload.is_empty() {
                put_nested_key(ipc_message::DATA, payload.len(), &mut ours);
                ours.extend_from_slice(&payload);
            }
            let prost = ipc::IpcMessage {
                version, r#type: kind, job_id: job_id.clone(), timestamp: timestamp as i64,
                sequence, data: payload.clone().into(),
            }.encode_to_vec();
            prop_assert_eq!(&ours, &prost);
            prop_assert_eq!(ours.len(), head + nested_len(payload.len()));

            // And read back field by field, as the receiver's fast path does.
            let mut rest = prost.as_slice();
            let read = |field: Field, rest: &mut &[u8]| {
                if next_is(field, rest) { read_varint(rest) } else { Some(0) }
            };
            prop_assert_eq!(read(ipc_message::VERSION, &mut rest), Some(u64::from(version)));
            prop_assert_eq!(read(ipc_message::TYPE, &mut rest), Some(kind as u64));
            let read_job_id = if next_is(ipc_message::JOB_ID, &mut rest) {
                read_bytes(&mut rest)
            } else {
                Some(&b""[..])
            };
            prop_assert_eq!(read_job_id, Some(job_id.as_bytes()));
            prop_assert_eq!(read(ipc_message::TIMESTAMP, &mut rest), Some(timestamp));
            prop_assert_eq!(read(ipc_message::SEQUENCE, &mut rest), Some(sequence));
            let read_data = if next_is(ipc_message::DATA, &mut rest) {
                read_bytes(&mut rest)
            } else {
                Some(&b""[..])
            };
            prop_assert_eq!(read_data, Some(payload.as_slice()));
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn varints_are_read_as_prost_reads_them(bytes in any::<Vec<u8>>()) {
            let mut ours = bytes.as_slice();
            let mut theirs = bytes.as_slice();
            let prost = prost::encoding::decode_varint(&mut theirs).ok();
            prop_assert_eq!(read_varint(&mut ours), prost);
            if prost.is_some() {
                prop_assert_eq!(ours.len(), theirs.len());
            }
        }
    }

    #[test]
    fn field_keys_are_number_and_wire_type() {
        assert_eq!(ipc_message::DATA.key(), 0x32);
        assert_eq!(log_data::PARTIAL.key(), 0x28);
        assert_eq!(log_line::PARTIAL.key(), 12 << 3);
        assert_eq!(log_record::CONTENT.number(), 4);
    }

    #[test]
    fn a_varint_field_is_read_past_the_others() {
        for sequence in [0u64, 1, 300, u64::MAX] {
            let record = joblet::LogRecord {
                stream: 2,
                timestamp: -5,
                sequence,
                content: Bytes::from_static(b"a line\n"),
                partial: true,
            };
            let encoded = record.encode_to_vec();
            assert_eq!(varint_field(&encoded, log_record::SEQUENCE), Ok(sequence));
            assert_eq!(
                varint_field(&encoded, log_record::TIMESTAMP),
                Ok(-5i64 as u64)
            );
            assert_eq!(varint_field(&encoded, Field::varint(9)), Ok(0));
        }
        let sequence = log_record::SEQUENCE;
        assert!(varint_field(&[0x18], sequence).is_err(), "a torn varint");
        assert!(
            varint_field(&[0x22, 5, b'x'], sequence).is_err(),
            "a torn field before it"
        );
        assert_eq!(
            varint_field(&[0x18, 7, 0x22, 5, b'x'], sequence),
            Ok(7),
            "what follows the field is not read"
        );
        assert!(log_record::sequence(&[0x08, 0x01, 0x18]).is_err(), "torn");
        assert_eq!(
            log_record::sequence(&[0x18, 0x05, 0x08, 0x01]),
            Ok(5),
            "reordered fields"
        );
    }
}
