//! QueryLogs with each `LogLine` encoded by the scan that reads it.
//!
//! A full scan sends millions of lines. Built as `LogLine` messages, each would cost the scan
//! two allocations (its job id and content) and the server's workers a protobuf encoding. Here
//! the scan encodes every line straight from RocksDB's block into a shared buffer, and the
//! gRPC codec copies those bytes into the response. The bytes on the wire are the ones prost
//! would write (a test compares them), so clients see the same `stream LogLine`.
//!
//! [`PersistRoutes`] is the service the server mounts: QueryLogs goes to this codec, every other
//! method to the generated `PersistServiceServer`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use joblet_proto::persist::persist_service_server::PersistServiceServer;
use joblet_proto::persist::{QueryLogsRequest, StreamType};
use joblet_proto::wire::log_line;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::service::{PersistApi, ResponseStream};
use crate::store::LogRecord;

const QUERY_LOGS_PATH: &str = "/joblet.persist.PersistService/QueryLogs";
/// Encoded lines share buffers of this size (a line never spans two).
const BUFFER_BYTES: usize = 64 * 1024;

/// Encodes the `LogLine`s of one query's job into shared buffers.
pub struct LineEncoder {
    /// Field 1 (`job_id`), the same for every line, encoded once.
    job_id_field: Vec<u8>,
    buffer: BytesMut,
}

impl LineEncoder {
    pub fn new(job_id: &str) -> Self {
        LineEncoder {
            job_id_field: log_line::job_id_field(job_id),
            buffer: BytesMut::new(),
        }
    }

    /// `record` as an encoded `LogLine`, as prost encodes it (proto3: fields at their default
    /// value are left out).
    pub fn encode(&mut self, record: &LogRecord<'_>) -> Bytes {
        let stream = match record.stream {
            joblet_ipc::Stream::Stderr => StreamType::Stderr,
            _ => StreamType::Stdout,
        };
        let (lost_lines, lost_reason) = record
            .gap
            .map_or((0, &b""[..]), |gap| (gap.lines, gap.reason.as_bytes()));
        let line = log_line::Line {
            stream: stream as i32,
            timestamp: record.timestamp,
            sequence: record.sequence,
            content: record.content,
            lost_lines,
            lost_reason,
            partial: record.partial,
        };
        let len = self.job_id_field.len() + line.encoded_len();
        if self.buffer.capacity() < len {
            self.buffer = BytesMut::with_capacity(len.max(BUFFER_BYTES));
        }
        line.encode(&self.job_id_field, &mut self.buffer);
        self.buffer.split().freeze()
    }
}

/// Requests decoded by prost; responses are messages already encoded.
#[derive(Debug, Clone, Copy, Default)]
struct EncodedLines;

impl Codec for EncodedLines {
    type Encode = Bytes;
    type Decode = QueryLogsRequest;
    type Encoder = EncodedLines;
    type Decoder = tonic_prost::ProstDecoder<QueryLogsRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedLines
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

impl Encoder for EncodedLines {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, line: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&line);
        Ok(())
    }
}

struct QueryLogs(Arc<PersistApi>);

impl ServerStreamingService<QueryLogsRequest> for QueryLogs {
    type Response = Bytes;
    type ResponseStream = ResponseStream<Bytes>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<QueryLogsRequest>) -> Self::Future {
        let result = self.0.query_logs_encoded(request.into_inner());
        Box::pin(std::future::ready(result.map(Response::new)))
    }
}

/// The persist service as mounted: QueryLogs with [`EncodedLines`], the rest generated.
#[derive(Clone)]
pub struct PersistRoutes {
    api: Arc<PersistApi>,
    generated: PersistServiceServer<PersistApi>,
    max_request_bytes: usize,
}

impl PersistRoutes {
    pub fn new(api: PersistApi, max_request_bytes: usize) -> Self {
        let api = Arc::new(api);
        PersistRoutes {
            generated: PersistServiceServer::from_arc(api.clone())
                .max_decoding_message_size(max_request_bytes),
            api,
            max_request_bytes,
        }
    }
}

impl NamedService for PersistRoutes {
    const NAME: &'static str = <PersistServiceServer<PersistApi> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for PersistRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != QUERY_LOGS_PATH {
            return self.generated.call(request);
        }
        let service = QueryLogs(self.api.clone());
        let max_request_bytes = self.max_request_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(EncodedLines)
                .apply_max_message_size_config(Some(max_request_bytes), None);
            Ok(grpc.server_streaming(service, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Gap;
    use joblet_proto::persist::LogLine;
    use prost::Message;

    #[test]
    fn lines_encode_to_the_bytes_prost_writes() {
        let mut encoder = LineEncoder::new("job-1");
        let cases = [
            (
                joblet_ipc::Stream::Stdout,
                1_760_000_000_000_000_000,
                1,
                &b"hello"[..],
            ),
            (
                joblet_ipc::Stream::Stderr,
                -5,
                u64::MAX,
                b"\xff\xfe not utf-8",
            ),
            (joblet_ipc::Stream::Stdout, 0, 0, b""),
            (joblet_ipc::Stream::Stderr, 7, 300, &[b'x'; 300][..]),
        ];
        let gap = Gap {
            lines: 300,
            reason: "frame too large",
        };
        let cases = cases
            .into_iter()
            .map(|case| (case, None))
            .chain([((joblet_ipc::Stream::Stdout, 9, 9, &b""[..]), Some(gap))]);
        for (((stream, timestamp, sequence, content), gap), partial) in
            cases.flat_map(|case| [(case, false), (case, true)])
        {
            let record = LogRecord {
                stream,
                timestamp,
                sequence,
                content,
                partial,
                gap,
            };
            let expected = LogLine {
                job_id: "job-1".into(),
                stream: match stream {
                    joblet_ipc::Stream::Stderr => StreamType::Stderr,
                    _ => StreamType::Stdout,
                } as i32,
                timestamp,
                sequence,
                content: Bytes::copy_from_slice(content),
                lost_lines: gap.map_or(0, |gap| gap.lines),
                lost_reason: gap.map_or(String::new(), |gap| gap.reason.to_owned()),
                partial,
            };
            assert_eq!(encoder.encode(&record), expected.encode_to_vec());
        }
    }
}
