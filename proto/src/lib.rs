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

/// Proto3 fields written by hand, as prost writes them (a field at its default value is left
/// out), for hot paths that encode a message straight from borrowed data.
pub mod wire {
    use bytes::BufMut;
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

    /// Encoded length of a varint field with a one-byte key (field numbers 1 to 15).
    pub fn varint_field_len(value: u64) -> usize {
        if value == 0 {
            0
        } else {
            1 + encoded_len_varint(value)
        }
    }

    pub fn put_varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
        if value != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(value, buf);
        }
    }

    /// Encoded length of a bytes (or string) field with a one-byte key.
    pub fn bytes_field_len(bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            0
        } else {
            1 + encoded_len_varint(bytes.len() as u64) + bytes.len()
        }
    }

    pub fn put_bytes_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
        if !bytes.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(bytes.len() as u64, buf);
            buf.put_slice(bytes);
        }
    }
}
