//! Framing: a 4-byte big-endian length followed by one protobuf message.
//!
//! Decoding is built on `tokio_util`'s `LengthDelimitedCodec` with an explicit maximum frame
//! length. An incomplete frame is a normal state (more bytes will come); a frame over the
//! maximum, bytes that do not decode, or a stream that ends inside a frame are errors, each with
//! its own [`FrameError`] variant so that receivers can count them by reason.

use std::io;
use std::marker::PhantomData;

use bytes::{BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, length_delimited};

/// Default maximum size of one frame's protobuf body.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Size of the length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("stream ended inside a frame ({remaining} bytes left over)")]
    Truncated { remaining: usize },
    #[error("frame does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("frame is not an IPCMessage: {0}")]
    Envelope(#[from] crate::batch::EnvelopeError),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// Short, stable label used as the `reason` of rejection counters.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Oversized { .. } => "oversized",
            FrameError::Truncated { .. } => "truncated",
            FrameError::Decode(_) | FrameError::Envelope(_) => "decode",
            FrameError::Io(_) => "io",
        }
    }
}

/// Encodes and decodes frames carrying messages of type `M`.
pub struct FrameCodec<M> {
    inner: LengthDelimitedCodec,
    max_frame_bytes: usize,
    _message: PhantomData<fn() -> M>,
}

impl<M> FrameCodec<M> {
    pub fn new(max_frame_bytes: usize) -> Self {
        let inner = length_delimited::Builder::new()
            .big_endian()
            .length_field_length(LENGTH_PREFIX_BYTES)
            .max_frame_length(max_frame_bytes)
            .new_codec();
        FrameCodec {
            inner,
            max_frame_bytes,
            _message: PhantomData,
        }
    }
}

/// Appends `message` as one frame to `buf`.
pub fn encode_frame<M: prost::Message>(
    message: &M,
    max_frame_bytes: usize,
    buf: &mut BytesMut,
) -> Result<(), FrameError> {
    let len = message.encoded_len();
    if len > max_frame_bytes {
        return Err(FrameError::Oversized {
            len,
            max: max_frame_bytes,
        });
    }
    buf.reserve(LENGTH_PREFIX_BYTES + len);
    // `len` fits in u32: it is at most `max_frame_bytes`, which the builder limits to u32.
    buf.put_u32(len as u32);
    // Room was reserved above, so the unchecked encoding cannot run out of space.
    message.encode_raw(buf);
    Ok(())
}

impl<M: prost::Message + Default> Decoder for FrameCodec<M> {
    type Item = M;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<M>, FrameError> {
        match self.inner.decode(src) {
            Ok(Some(frame)) => Ok(Some(M::decode(frame.freeze())?)),
            Ok(None) => Ok(None),
            Err(error) => {
                let oversized = error
                    .get_ref()
                    .is_some_and(|inner| inner.is::<length_delimited::LengthDelimitedCodecError>());
                if oversized {
                    let len = peek_length(src).unwrap_or(0);
                    Err(FrameError::Oversized {
                        len,
                        max: self.max_frame_bytes,
                    })
                } else {
                    Err(FrameError::Io(error))
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<M>, FrameError> {
        match self.decode(buf)? {
            Some(message) => Ok(Some(message)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                remaining: buf.len(),
            }),
        }
    }
}

impl<M: prost::Message> Encoder<&M> for FrameCodec<M> {
    type Error = FrameError;

    fn encode(&mut self, message: &M, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(message, self.max_frame_bytes, dst)
    }
}

fn peek_length(src: &BytesMut) -> Option<usize> {
    let prefix: [u8; LENGTH_PREFIX_BYTES] = src.get(..LENGTH_PREFIX_BYTES)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{log_message, metric_message};
    use joblet_proto::ipc::{IpcMessage, LogData, MetricData, Stream};
    use proptest::prelude::*;

    fn arbitrary_message() -> impl Strategy<Value = IpcMessage> {
        let log = (
            "[a-z0-9-]{1,36}",
            any::<i64>(),
            any::<u64>(),
            prop::bool::ANY,
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(job, ts, seq, stderr, content)| {
                let stream = if stderr {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                log_message(&job, seq, ts, stream, content.into())
            });
        let metric = ("[a-z0-9-]{1,36}", any::<i64>(), any::<u64>(), any::<i64>()).prop_map(
            |(job, ts, seq, memory)| {
                metric_message(
                    &job,
                    seq,
                    ts,
                    &MetricData {
                        memory_bytes: memory,
                        cpu_percent: 12.5,
                        ..Default::default()
                    },
                )
            },
        );
        prop_oneof![log, metric]
    }

    proptest! {
        /// Any sequence of messages, encoded back to back and fed to the decoder in chunks cut
        /// at arbitrary byte boundaries, decodes to the same sequence.
        #[test]
        fn frames_round_trip_across_arbitrary_splits(
            messages in prop::collection::vec(arbitrary_message(), 0..40),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let mut wire = BytesMut::new();
            for message in &messages {
                encode_frame(message, DEFAULT_MAX_FRAME_BYTES, &mut wire).unwrap();
            }
            let wire = wire.freeze();
            let mut cut_points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            cut_points.push(wire.len());
            cut_points.sort_unstable();

            let mut codec = FrameCodec::<IpcMessage>::new(DEFAULT_MAX_FRAME_BYTES);
            let mut buffer = BytesMut::new();
            let mut decoded = Vec::new();
            let mut start = 0;
            for end in cut_points {
                buffer.extend_from_slice(&wire[start..end]);
                start = end;
                while let Some(message) = codec.decode(&mut buffer).unwrap() {
                    decoded.push(message);
                }
            }
            prop_assert_eq!(codec.decode_eof(&mut buffer).unwrap(), None);
            prop_assert_eq!(decoded, messages);
        }
    }

    #[test]
    fn oversized_frame_is_an_error_not_an_allocation() {
        let mut codec = FrameCodec::<IpcMessage>::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.put_slice(b"abc");
        let error = codec.decode(&mut buf).unwrap_err();
        assert_eq!(error.reason(), "oversized", "{error}");
        assert!(error.to_string().contains("4294967295"), "{error}");
    }

    #[test]
    fn truncated_frame_at_end_of_stream_is_an_error() {
        let mut wire = BytesMut::new();
        let message = log_message("job", 1, 1, Stream::Stdout, "hello".into());
        encode_frame(&message, 1024, &mut wire).unwrap();
        wire.truncate(wire.len() - 2);
        let mut codec = FrameCodec::<IpcMessage>::new(1024);
        assert_eq!(codec.decode(&mut wire).unwrap(), None);
        let error = codec.decode_eof(&mut wire).unwrap_err();
        assert_eq!(error.reason(), "truncated", "{error}");
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        let mut codec = FrameCodec::<IpcMessage>::new(1024);
        assert_eq!(codec.decode(&mut buf).unwrap_err().reason(), "decode");
    }

    #[test]
    fn encoder_refuses_messages_over_the_limit() {
        let message = log_message("job", 1, 1, Stream::Stdout, vec![b'x'; 2000].into());
        let mut buf = BytesMut::new();
        let error = encode_frame(&message, 1024, &mut buf).unwrap_err();
        assert_eq!(error.reason(), "oversized");
        assert!(buf.is_empty());
    }

    #[test]
    fn log_payload_survives_invalid_utf8() {
        let content = bytes::Bytes::from_static(&[0xc3, 0x28, 0x00, 0xff]);
        let message = log_message("job", 7, 9, Stream::Stderr, content.clone());
        let data: LogData = prost::Message::decode(message.data.clone()).unwrap();
        assert_eq!(data.content, content);
        assert_eq!(data.stream(), Stream::Stderr);
    }
}
