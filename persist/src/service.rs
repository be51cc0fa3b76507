//! The gRPC query API (`joblet.persist.PersistService`). Requests are validated into a
//! [`Selection`] here; every store error maps to a status in [`status_of`].
//!
//! Scans run on the blocking pool and hand lines to the response stream in chunks through a
//! bounded channel: the response is never built up whole, and a client that goes away closes
//! the channel, which ends the scan.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use joblet_daemon::lock;
use joblet_ipc::MetricData;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use joblet_proto::joblet::JobMetricsEvent;
use joblet_proto::persist::persist_service_server::PersistService;
use joblet_proto::persist::{
    DeleteJobRequest, DeleteJobResponse, ListJobsRequest, ListJobsResponse, LogLine, Metric,
    PingRequest, PingResponse, QueryLogsRequest, QueryMetricsRequest, StreamType,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::log_route::LineEncoder;
use crate::metrics as m;
use crate::store::{CatalogueFilter, Selection, Store, StoreError, StreamFilter};

/// Records per chunk handed from a scan to the response stream. The first chunk holds one
/// record so that the first line reaches the client at once; chunks then double up to this.
const CHUNK_RECORDS: usize = 512;
/// Records QueryLogs examines on the answering worker for the first line (see
/// `query_logs_encoded`) before the blocking pool takes over.
const FIRST_EXAMINED: usize = 64;
/// Chunks buffered per query; when full, the scan waits for the client to read.
const CHUNKS_IN_FLIGHT: usize = 8;

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct PersistApi {
    store: Arc<Store>,
    max_tail: u32,
    started: Instant,
}

impl PersistApi {
    pub fn new(store: Arc<Store>, max_tail: u32) -> Self {
        PersistApi {
            store,
            max_tail,
            started: Instant::now(),
        }
    }

    fn selection(&self, window: Window<'_>) -> Result<Selection, Status> {
        let Window {
            job_id,
            start_time,
            end_time,
            limit,
            offset,
            after_sequence,
            tail,
        } = window;
        let job_id = self.store.resolve_job(job_id).map_err(status_of)?;
        let bound = |field: &'static str, value: i64| match value {
            0 => Ok(None),
            v if v < 0 => Err(invalid(
                field,
                "must not be negative (Unix nanoseconds, 0 = open)",
            )),
            v => Ok(Some(v)),
        };
        let start = bound("start_time", start_time)?;
        let end = bound("end_time", end_time)?;
        if let (Some(start), Some(end)) = (start, end)
            && end <= start
        {
            return Err(invalid(
                "end_time",
                "must be after start_time (start is inclusive, end exclusive)",
            ));
        }
        let limit = match limit {
            0 => None,
            l if l < 0 => return Err(invalid("limit", "must not be negative")),
            l => Some(l as usize),
        };
        if offset < 0 {
            return Err(invalid("offset", "must not be negative"));
        }
        if tail > self.max_tail {
            return Err(invalid(
                "tail",
                &format!("must be at most {} (query.max_tail)", self.max_tail),
            ));
        }
        Ok(Selection {
            job_id,
            start,
            end,
            after_sequence,
            offset: offset as usize,
            limit,
            tail: (tail > 0).then_some(tail as usize),
            ..Default::default()
        })
    }
}

impl PersistApi {
    /// QueryLogs, its lines encoded as `LogLine` messages by the scan (see
    /// [`crate::log_route`]).
    pub fn query_logs_encoded(
        &self,
        request: QueryLogsRequest,
    ) -> Result<ResponseStream<Bytes>, Status> {
        let started = Instant::now();
        let parsed = (|| {
            let streams = match StreamType::try_from(request.stream) {
                Ok(StreamType::Unspecified) => StreamFilter::Both,
                Ok(StreamType::Stdout) => StreamFilter::Stdout,
                Ok(StreamType::Stderr) => StreamFilter::Stderr,
                Err(_) => return Err(invalid("stream", "must be STDOUT, STDERR or unspecified")),
            };
            let selection = self.selection(window_of!(request))?;
            Ok((streams, selection))
        })();
        let (streams, mut selection) = parsed.inspect_err(|s| count_rejection("QueryLogs", s))?;
        tracing::debug!(job_id = %selection.job_id, "QueryLogs");
        let contains = request.contains.into_bytes();
        let mut lines = LineEncoder::new(&selection.job_id);

        // The first line is read here, on the worker answering the call: the client waits for
        // it, and bringing it from the blocking pool would cost two thread wake-ups. This looks
        // at no more than FIRST_EXAMINED records; the blocking pool goes on from there.
        let mut first = None;
        if selection.tail.is_none() && selection.offset == 0 {
            let probe = Selection {
                examine_at_most: Some(FIRST_EXAMINED),
                ..selection.clone()
            };
            let mut found = None;
            let stopped = self
                .store
                .scan_logs(&probe, streams, &contains, |record| {
                    first = Some(lines.encode(&record));
                    found = Some((record.timestamp, record.sequence));
                    ControlFlow::Break(())
                })
                .map_err(|error| {
                    metrics::counter!(m::QUERY_ERRORS, "rpc" => "QueryLogs", "code" => "internal")
                        .increment(1);
                    status_of(error)
                })?;
            selection.resume_after = found.or(stopped);
            if selection.resume_after.is_none() {
                selection.limit = Some(0); // nothing matches
            } else if first.is_some() {
                selection.limit = selection.limit.map(|limit| limit - 1);
            }
        }
        let store = self.store.clone();
        if first.is_some() {
            metrics::histogram!(m::QUERY_FIRST_RECORD, "rpc" => "QueryLogs")
                .record(started.elapsed().as_secs_f64());
        }
        let rest = stream_scan("QueryLogs", started, first.is_some(), move |emit| {
            if selection.limit == Some(0) {
                return Ok(());
            }
            store
                .scan_logs(&selection, streams, &contains, |record| {
                    emit(lines.encode(&record))
                })
                .map(drop)
        });
        Ok(Box::pin(futures::stream::iter(first.map(Ok)).chain(rest)))
    }
}

/// Queries whose scan runs: when each started, and since when it has worked without handing
/// its client a record (`None` while it waits for the client to take some).
static IN_FLIGHT: Mutex<BTreeMap<u64, (Instant, Option<Instant>)>> = Mutex::new(BTreeMap::new());
static NEXT_QUERY: AtomicU64 = AtomicU64::new(0);

/// A query in [`IN_FLIGHT`] while this lives.
struct InFlight(u64);

impl InFlight {
    fn start() -> InFlight {
        let id = NEXT_QUERY.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        lock(&IN_FLIGHT).insert(id, (now, Some(now)));
        InFlight(id)
    }

    fn working(&self, working: bool) {
        if let Some(query) = lock(&IN_FLIGHT).get_mut(&self.0) {
            query.1 = working.then(Instant::now);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&IN_FLIGHT).remove(&self.0);
    }
}

/// Of the running queries: the age of the oldest (client time included), and the longest any
/// has worked without handing its client a record (a scan stuck in the store shows there long
/// before it ends and is recorded in the histograms).
pub fn in_flight() -> (std::time::Duration, std::time::Duration) {
    let queries = lock(&IN_FLIGHT);
    let oldest = queries.values().map(|(started, _)| started.elapsed()).max();
    let stall = queries
        .values()
        .filter_map(|(_, working)| *working)
        .map(|w| w.elapsed())
        .max();
    (oldest.unwrap_or_default(), stall.unwrap_or_default())
}

/// The request fields QueryLogs and QueryMetrics share.
struct Window<'a> {
    job_id: &'a str,
    start_time: i64,
    end_time: i64,
    limit: i32,
    offset: i32,
    after_sequence: u64,
    tail: u32,
}

/// The [`Window`] of a QueryLogsRequest or QueryMetricsRequest (their fields share names).
macro_rules! window_of {
    ($request:expr) => {
        Window {
            job_id: &$request.job_id,
            start_time: $request.start_time,
            end_time: $request.end_time,
            limit: $request.limit,
            offset: $request.offset,
            after_sequence: $request.after_sequence,
            tail: $request.tail,
        }
    };
}
use window_of;

/// Calls a viewer certificate may make: every query; not DeleteJob.
pub fn read_only(path: &str) -> bool {
    matches!(
        path,
        "/joblet.persist.PersistService/QueryLogs"
            | "/joblet.persist.PersistService/QueryMetrics"
            | "/joblet.persist.PersistService/ListJobs"
            | "/joblet.persist.PersistService/Ping"
    )
}

fn invalid(field: &str, message: &str) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// The one place store errors become gRPC statuses.
pub fn status_of(error: StoreError) -> Status {
    match error {
        StoreError::NotFound(_) => Status::not_found(error.to_string()),
        StoreError::Ambiguous { .. } | StoreError::InvalidArgument { .. } => {
            Status::invalid_argument(error.to_string())
        }
        StoreError::Rocks(_) | StoreError::MissingColumnFamily(_) | StoreError::Aborted => {
            tracing::error!(%error, "store error");
            Status::internal("storage error (see joblet-persist's log)")
        }
    }
}

/// Runs `scan` on the blocking pool and returns its records as a response stream. The query's
/// server time is recorded, not the time it waits for its client to take records:
/// `joblet_persist_query_duration_seconds` (the whole query, from `started`) and
/// `joblet_persist_query_first_record_seconds` (unless `first_sent`: the caller sent one).
fn stream_scan<T: Send + 'static>(
    rpc: &'static str,
    started: Instant,
    first_sent: bool,
    scan: impl FnOnce(&mut dyn FnMut(T) -> ControlFlow<()>) -> Result<(), StoreError> + Send + 'static,
) -> ResponseStream<T> {
    let (chunks, chunks_rx) = mpsc::channel::<Result<Vec<T>, Status>>(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let query = InFlight::start();
        let mut waited = std::time::Duration::ZERO;
        let mut first_sent = first_sent;
        let mut send = |chunk| {
            if !first_sent {
                first_sent = true;
                metrics::histogram!(m::QUERY_FIRST_RECORD, "rpc" => rpc)
                    .record((started.elapsed() - waited).as_secs_f64());
            }
            query.working(false);
            let wait = Instant::now();
            let sent = chunks.blocking_send(chunk);
            waited += wait.elapsed();
            query.working(true);
            sent
        };
        let mut chunk_size = 1;
        let mut chunk = Vec::with_capacity(chunk_size);
        let mut emit = |record: T| {
            chunk.push(record);
            if chunk.len() < chunk_size {
                return ControlFlow::Continue(());
            }
            chunk_size = (chunk_size * 2).min(CHUNK_RECORDS);
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(chunk_size));
            match send(Ok(full)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()), // the client went away
            }
        };
        let result = scan(&mut emit);
        let last = match result {
            Ok(()) => Ok(chunk),
            Err(error) => {
                metrics::counter!(m::QUERY_ERRORS, "rpc" => rpc, "code" => "internal").increment(1);
                Err(status_of(error))
            }
        };
        let _ = send(last);
        metrics::histogram!(m::QUERY_DURATION, "rpc" => rpc)
            .record((started.elapsed() - waited).as_secs_f64());
    });
    Box::pin(ReceiverStream::new(chunks_rx).flat_map(|chunk| {
        let (records, error) = match chunk {
            Ok(records) => (records, None),
            Err(status) => (Vec::new(), Some(Err(status))),
        };
        futures::stream::iter(records.into_iter().map(Ok).chain(error))
    }))
}

fn count_rejection(rpc: &'static str, status: &Status) {
    let code = match status.code() {
        tonic::Code::NotFound => "not_found",
        tonic::Code::InvalidArgument => "invalid_argument",
        _ => "other",
    };
    metrics::counter!(m::QUERY_ERRORS, "rpc" => rpc, "code" => code).increment(1);
}

#[tonic::async_trait]
impl PersistService for PersistApi {
    type QueryLogsStream = ResponseStream<LogLine>;
    type QueryMetricsStream = ResponseStream<Metric>;

    /// Served by [`crate::log_route`], which sends the encoded lines as they are; this is the
    /// same query for callers of the generated service.
    async fn query_logs(
        &self,
        request: Request<QueryLogsRequest>,
    ) -> Result<Response<Self::QueryLogsStream>, Status> {
        let lines = self.query_logs_encoded(request.into_inner())?;
        Ok(Response::new(Box::pin(lines.map(|line| {
            LogLine::decode(line?).map_err(|e| Status::internal(format!("encoded line: {e}")))
        }))))
    }

    async fn query_metrics(
        &self,
        request: Request<QueryMetricsRequest>,
    ) -> Result<Response<Self::QueryMetricsStream>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let selection = self
            .selection(window_of!(request))
            .inspect_err(|s| count_rejection("QueryMetrics", s))?;
        let store = self.store.clone();
        Ok(Response::new(stream_scan(
            "QueryMetrics",
            started,
            false,
            move |emit| {
                let job_id = selection.job_id.clone();
                store
                    .scan_metrics(&selection, |record| {
                        let event = |sample: &MetricData| JobMetricsEvent {
                            timestamp: record.timestamp,
                            job_uuid: job_id.clone(),
                            cpu_percent: sample.cpu_percent,
                            memory_bytes: sample.memory_bytes,
                            memory_limit: sample.memory_limit,
                            disk_read_bytes: sample.io_read_bytes,
                            disk_write_bytes: sample.io_write_bytes,
                            net_recv_bytes: sample.net_recv_bytes,
                            net_sent_bytes: sample.net_sent_bytes,
                            pids: sample.pids,
                            sequence: record.sequence,
                            cpu_pressure_some: sample.cpu_pressure_some,
                            memory_pressure_some: sample.memory_pressure_some,
                            memory_pressure_full: sample.memory_pressure_full,
                            ..Default::default()
                        };
                        let rollup = record.rollup.as_ref();
                        emit(Metric {
                            job_id: job_id.clone(),
                            timestamp: record.timestamp,
                            sequence: record.sequence,
                            sample: Some(event(&record.sample)),
                            resolution_seconds: if rollup.is_some() { 60 } else { 0 },
                            samples: rollup.map_or(1, |r| r.samples),
                            min: rollup.and_then(|r| r.min.as_ref()).map(event),
                            max: rollup.and_then(|r| r.max.as_ref()).map(event),
                        })
                    })
                    .map(drop)
            },
        )))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let request = request.into_inner();
        if request.since < 0 || request.until < 0 {
            return Err(invalid("since", "since and until must not be negative"));
        }
        let filter = CatalogueFilter {
            prefix: request.job_id_prefix,
            since: (request.since > 0).then_some(request.since),
            until: (request.until > 0).then_some(request.until),
            statuses: request.statuses,
            limit: (request.limit > 0).then_some(request.limit as usize),
        };
        let store = self.store.clone();
        let jobs = tokio::task::spawn_blocking(move || store.list_catalogue(&filter))
            .await
            .map_err(|e| Status::internal(format!("list task failed: {e}")))?
            .map_err(status_of)?;
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn delete_job(
        &self,
        request: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let job_id = request.into_inner().job_id;
        if job_id.is_empty() {
            return Err(invalid("job_id", "must not be empty"));
        }
        let store = self.store.clone();
        let existed = tokio::task::spawn_blocking(move || store.delete_job(&job_id))
            .await
            .map_err(|e| Status::internal(format!("delete task failed: {e}")))?
            .map_err(status_of)?;
        Ok(Response::new(DeleteJobResponse { existed }))
    }

    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
        }))
    }
}
