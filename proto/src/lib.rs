//! Generated protocol types and services.
//!
//! - [`joblet`]: the public API of joblet-core, wire-compatible with joblet-proto v2.5.9, plus
//!   our sequence-aware streams.
//! - [`persist`]: the query API of joblet-persist.
//! - [`ipc`]: the frames core sends to persist over the Unix socket, and persist's acks.

#[allow(clippy::all, clippy::pedantic)]
pub mod joblet {
    tonic::include_proto!("joblet");

    #[allow(clippy::all, clippy::pedantic)]
    pub mod persist {
        tonic::include_proto!("joblet.persist");
    }

    #[allow(clippy::all, clippy::pedantic)]
    pub mod ipc {
        tonic::include_proto!("joblet.ipc");
    }
}

pub use joblet::ipc;
pub use joblet::persist;

/// Status of a job in persist's catalogue whose data came without a record (stored before
/// core replicated job records).
pub const UNKNOWN_STATUS: &str = "UNKNOWN";

impl persist::JobSummary {
    /// When the job was submitted (Unix ns): its record's, or else its first stored line's.
    pub fn created(&self) -> i64 {
        self.record
            .as_ref()
            .map_or(self.first_timestamp, |record| record.created)
    }

    /// The job's status from its record, or [`UNKNOWN_STATUS`].
    pub fn status(&self) -> &str {
        self.record
            .as_ref()
            .and_then(|record| record.job.as_ref())
            .map_or(UNKNOWN_STATUS, |job| job.status.as_str())
    }
}

/// Proto3 fields written by hand, as prost writes them (a field at its default value is left
/// out), for hot paths that encode a message straight from borrowed data. Field numbers are 1
/// to 15 (one-byte keys). A field's key and varint are put with one `put_slice`, not a byte at
/// a time as `prost::encoding::encode_varint` does.
pub mod wire {
    use bytes::BufMut;
    use prost::encoding::encoded_len_varint;

    const VARINT: u8 = 0;
    const LENGTH_DELIMITED: u8 = 2;

    /// The one-byte key of field `tag` (1 to 15).
    fn key(tag: u32, wire_type: u8) -> u8 {
        debug_assert!((1..16).contains(&tag), "field {tag} needs a longer key");
        (tag as u8) << 3 | wire_type
    }

    /// Puts `key` and the varint `value` with one `put_slice`.
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

    /// Encoded length of a varint field.
    pub fn varint_field_len(value: u64) -> usize {
        if value == 0 {
            0
        } else {
            1 + encoded_len_varint(value)
        }
    }

    pub fn put_varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
        if value != 0 {
            put_key_and_varint(key(tag, VARINT), value, buf);
        }
    }

    /// Encoded length of a bytes (or string) field.
    pub fn bytes_field_len(bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            0
        } else {
            1 + encoded_len_varint(bytes.len() as u64) + bytes.len()
        }
    }

    pub fn put_bytes_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
        if !bytes.is_empty() {
            put_length_delimited_key(tag, bytes.len(), buf);
            buf.put_slice(bytes);
        }
    }

    /// The key and length of a length-delimited field (a nested message) of `len` bytes,
    /// which the caller writes next.
    pub fn put_length_delimited_key(tag: u32, len: usize, buf: &mut impl BufMut) {
        put_key_and_varint(key(tag, LENGTH_DELIMITED), len as u64, buf);
    }

    /// The value of varint field `tag` of an encoded message (0 when absent, as proto3 reads
    /// it), read up to its first occurrence: the fields before it are skipped without decoding,
    /// those after it (a record's content, say) not even looked at. Meant for messages whose
    /// writers put the field once, as ours do.
    pub fn varint_field(mut message: &[u8], tag: u32) -> Result<u64, prost::DecodeError> {
        use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
        while !message.is_empty() {
            let (field, wire_type) = decode_key(&mut message)?;
            if field == tag && wire_type == WireType::Varint {
                return decode_varint(&mut message);
            }
            skip_field(wire_type, field, &mut message, DecodeContext::default())?;
        }
        Ok(0)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use prost::encoding::{WireType, encode_key, encode_varint};

        #[test]
        fn fields_are_what_prost_writes() {
            let mut values = vec![0u64, 1, 127, 128, 300, u64::MAX, i64::MIN as u64];
            values.extend((0..64).map(|shift| 1u64 << shift));
            values.extend((0..64).map(|shift| (1u64 << shift) - 1));
            for tag in 1..16 {
                for &value in &values {
                    let (mut ours, mut prost) = (Vec::new(), Vec::new());
                    put_varint_field(tag, value, &mut ours);
                    if value != 0 {
                        encode_key(tag, WireType::Varint, &mut prost);
                        encode_varint(value, &mut prost);
                    }
                    assert_eq!(ours, prost, "field {tag} = {value}");
                    assert_eq!(ours.len(), varint_field_len(value));
                }
                for len in [0usize, 1, 127, 128, 20_000] {
                    let bytes = vec![7u8; len];
                    let (mut ours, mut prost) = (Vec::new(), Vec::new());
                    put_bytes_field(tag, &bytes, &mut ours);
                    if len > 0 {
                        prost::encoding::bytes::encode(tag, &bytes, &mut prost);
                    }
                    assert_eq!(ours, prost, "field {tag}, {len} bytes");
                    assert_eq!(ours.len(), bytes_field_len(&bytes));
                }
            }
        }

        #[test]
        fn a_varint_field_is_read_past_the_others() {
            for sequence in [0u64, 1, 300, u64::MAX] {
                let record = crate::joblet::LogRecord {
                    stream: 2,
                    timestamp: -5,
                    sequence,
                    content: bytes::Bytes::from_static(b"a line\n"),
                    partial: true,
                };
                let encoded = prost::Message::encode_to_vec(&record);
                assert_eq!(varint_field(&encoded, 3), Ok(sequence));
                assert_eq!(varint_field(&encoded, 2), Ok(-5i64 as u64));
                assert_eq!(varint_field(&encoded, 9), Ok(0));
            }
            assert!(varint_field(&[0x18], 3).is_err(), "a torn varint");
            assert!(
                varint_field(&[0x22, 5, b'x'], 3).is_err(),
                "a torn field before it"
            );
            assert_eq!(
                varint_field(&[0x18, 7, 0x22, 5, b'x'], 3),
                Ok(7),
                "what follows the field is not read"
            );
        }
    }
}
