//! The public gRPC API: `joblet.JobService` and `joblet.MonitoringService`, wire-compatible
//! with joblet-proto v2.5.9, plus our sequence-aware streams.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use joblet_ipc::MetricData;
use joblet_proto::joblet::job_service_server::JobService;
use joblet_proto::joblet::monitoring_service_server::MonitoringService;
use joblet_proto::joblet::{
    CancelJobRequest, CancelJobResponse, CpuMetrics, DataChunk, DeleteAllJobsRequest,
    DeleteAllJobsResponse, DeleteJobRequest, DeleteJobResponse, EmptyRequest, GetJobLogsRequest,
    GetJobMetricsRequest, GetJobStatusRequest, GetJobStatusResponse, HostInfo, Job as JobMessage,
    JobMetricsEvent, Jobs, LogRecord, LogStream, MemoryMetrics, MetricRecord, RunJobRequest,
    RunJobResponse, ServerVersionInfo, StopJobRequest, StopJobResponse, StreamJobMetricsRequest,
    StreamLogsRequest, StreamMetricsRequest, SystemStatusResponse,
};
use joblet_proto::persist::{QueryLogsRequest, QueryMetricsRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::CoreError;
use crate::job::{Job, rfc3339};
use crate::manager::JobManager;
use crate::metrics_log::Sample;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Messages buffered per response stream; a slow client makes its producer wait, nothing else.
const STREAM_BUFFER: usize = 256;
const MASK: &str = "***";

pub struct JobApi {
    manager: Arc<JobManager>,
}

/// Where a job's answers come from.
enum Found {
    Core(Arc<Job>),
    History(crate::history::PersistAddress),
}

impl JobApi {
    pub fn new(manager: Arc<JobManager>) -> Self {
        JobApi { manager }
    }

    fn find(&self, id: &str) -> Result<Arc<Job>, Status> {
        self.manager.find(id).map_err(CoreError::into_status)
    }

    /// The job core holds, or — for one it does not know — persist's query API to answer
    /// from history (when core uses one).
    fn find_or_history(&self, id: &str) -> Result<Found, Status> {
        match self.manager.find(id) {
            Ok(job) => Ok(Found::Core(job)),
            Err(CoreError::NotFound(_)) => match self.manager.config().persist.query_target() {
                Some(address) => Ok(Found::History(address)),
                None => Err(CoreError::NotFound(id.to_owned()).into_status()),
            },
            Err(error) => Err(error.into_status()),
        }
    }
}

/// Calls a viewer certificate may make: status, lists, logs, metrics, system status.
pub fn read_only(path: &str) -> bool {
    matches!(
        path,
        "/joblet.JobService/GetJobStatus"
            | "/joblet.JobService/ListJobs"
            | "/joblet.JobService/GetJobLogs"
            | "/joblet.JobService/StreamJobMetrics"
            | "/joblet.JobService/GetJobMetrics"
            | "/joblet.JobService/StreamLogs"
            | "/joblet.JobService/StreamMetrics"
            | "/joblet.MonitoringService/GetSystemStatus"
    )
}

fn masked(
    map: &std::collections::BTreeMap<String, String>,
) -> std::collections::HashMap<String, String> {
    map.keys().map(|k| (k.clone(), MASK.to_owned())).collect()
}

fn status_response(job: &Job, node_id: &str) -> GetJobStatusResponse {
    let state = job.state();
    let spec = &job.spec;
    GetJobStatusResponse {
        uuid: job.id.clone(),
        command: spec.command.clone(),
        args: spec.args.clone(),
        max_cpu: spec.max_cpu as i32,
        cpu_cores: spec.cpu_cores.clone(),
        max_memory: spec.max_memory_mb as i32,
        max_io_bps: spec.max_io_bps.min(i32::MAX as u64) as i32,
        status: state.status.as_str().to_owned(),
        start_time: rfc3339(state.start_time),
        end_time: rfc3339(state.end_time),
        exit_code: state.exit_code,
        scheduled_time: rfc3339(spec.schedule),
        environment: spec.environment.clone().into_iter().collect(),
        secret_environment: masked(&spec.secret_environment),
        network: spec.network_name.clone(),
        work_dir: job.work_dir.display().to_string(),
        uploads: spec
            .uploads
            .iter()
            .map(|u| u.path.display().to_string())
            .collect(),
        node_id: node_id.to_owned(),
        timeout: spec.timeout_text.clone(),
        status_reason: state.reason,
        ..Default::default()
    }
}

/// The public `Job` message of `job` (also what is replicated to persist's catalogue).
pub fn job_message(job: &Job, node_id: &str) -> JobMessage {
    let s = status_response(job, node_id);
    JobMessage {
        uuid: s.uuid,
        command: s.command,
        args: s.args,
        max_cpu: s.max_cpu,
        cpu_cores: s.cpu_cores,
        max_memory: s.max_memory,
        max_io_bps: s.max_io_bps,
        status: s.status,
        start_time: s.start_time,
        end_time: s.end_time,
        exit_code: s.exit_code,
        scheduled_time: s.scheduled_time,
        environment: s.environment,
        secret_environment: s.secret_environment,
        node_id: s.node_id,
        timeout: s.timeout,
        status_reason: s.status_reason,
        created_time: job
            .created
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        ..Default::default()
    }
}

/// A job core no longer holds, from persist's catalogue: its record when persist has one, or
/// just its id and status UNKNOWN (history stored before records were replicated).
fn history_status(summary: joblet_proto::persist::JobSummary) -> GetJobStatusResponse {
    let Some(job) = summary.record.and_then(|record| record.job) else {
        return GetJobStatusResponse {
            uuid: summary.job_id,
            status: joblet_proto::UNKNOWN_STATUS.to_owned(),
            history: true,
            ..Default::default()
        };
    };
    GetJobStatusResponse {
        uuid: job.uuid,
        command: job.command,
        args: job.args,
        max_cpu: job.max_cpu,
        cpu_cores: job.cpu_cores,
        max_memory: job.max_memory,
        max_io_bps: job.max_io_bps,
        status: job.status,
        start_time: job.start_time,
        end_time: job.end_time,
        exit_code: job.exit_code,
        scheduled_time: job.scheduled_time,
        environment: job.environment,
        secret_environment: job.secret_environment,
        node_id: job.node_id,
        timeout: job.timeout,
        status_reason: job.status_reason,
        history: true,
        ..Default::default()
    }
}

pub fn metric_event(
    job_id: &str,
    timestamp: i64,
    sequence: u64,
    data: &MetricData,
) -> JobMetricsEvent {
    JobMetricsEvent {
        timestamp,
        job_uuid: job_id.to_owned(),
        cpu_percent: data.cpu_percent,
        memory_bytes: data.memory_bytes,
        memory_limit: data.memory_limit,
        disk_read_bytes: data.io_read_bytes,
        disk_write_bytes: data.io_write_bytes,
        net_recv_bytes: data.net_recv_bytes,
        net_sent_bytes: data.net_sent_bytes,
        pids: data.pids,
        sequence,
        cpu_pressure_some: data.cpu_pressure_some,
        memory_pressure_some: data.memory_pressure_some,
        memory_pressure_full: data.memory_pressure_full,
        ..Default::default()
    }
}

fn sample_event(job_id: &str, sample: &Sample) -> JobMetricsEvent {
    metric_event(job_id, sample.timestamp, sample.sequence, &sample.data)
}

/// A response stream fed by `produce` through a bounded channel. `produce` should return when
/// sending fails (the client went away). When core shuts down the stream ends with
/// UNAVAILABLE, so that a following client reconnects (the job may run on) rather than take
/// the end for the job's.
fn channel_stream<T, F, Fut>(shutdown: &CancellationToken, produce: F) -> ResponseStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    let produced = produce(sender.clone());
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = produced => {}
            () = shutdown.cancelled() => {
                let _ = sender
                    .send(Err(Status::unavailable(
                        "joblet-core is shutting down; reconnect to continue",
                    )))
                    .await;
            }
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}

/// Streams a job's log records after `after_sequence` (following until the job ends).
fn log_records(
    job: Arc<Job>,
    after_sequence: u64,
    follow: bool,
) -> Result<mpsc::Receiver<Result<Vec<LogRecord>, Status>>, Status> {
    let mut reader = job
        .output
        .reader(after_sequence)
        .map_err(|e| Status::internal(format!("open spool: {e}")))?;
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let batch = match reader.next_batch(follow).await {
                Ok(Some(batch)) => Ok(batch),
                Ok(None) => return,
                Err(error) => Err(Status::internal(format!("read spool: {error}"))),
            };
            let failed = batch.is_err();
            if sender.send(batch).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(receiver)
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn run_job(
        &self,
        request: Request<RunJobRequest>,
    ) -> Result<Response<RunJobResponse>, Status> {
        let job = self
            .manager
            .run(request.into_inner())
            .await
            .map_err(CoreError::into_status)?;
        Ok(Response::new(RunJobResponse {
            job_uuid: job.id.clone(),
            status: job.status().as_str().to_owned(),
        }))
    }

    async fn get_job_status(
        &self,
        request: Request<GetJobStatusRequest>,
    ) -> Result<Response<GetJobStatusResponse>, Status> {
        let id = request.into_inner().uuid;
        let job = match self.find_or_history(&id)? {
            Found::Core(job) => job,
            Found::History(address) => {
                let summary = crate::history::find_job(&address, &id).await?;
                return Ok(Response::new(history_status(summary)));
            }
        };
        Ok(Response::new(status_response(
            &job,
            &self.manager.config().node_id,
        )))
    }

    async fn stop_job(
        &self,
        request: Request<StopJobRequest>,
    ) -> Result<Response<StopJobResponse>, Status> {
        let request = request.into_inner();
        let grace =
            match request.grace_period.trim() {
                "" => None,
                text => Some(humantime::parse_duration(text).map_err(|e| {
                    Status::invalid_argument(format!("grace_period: {text:?}: {e}"))
                })?),
            };
        let job = self.find(&request.uuid)?;
        self.manager
            .stop(&job, grace)
            .await
            .map_err(CoreError::into_status)?;
        let state = job.state();
        Ok(Response::new(StopJobResponse {
            uuid: job.id.clone(),
            status: state.status.as_str().to_owned(),
            end_time: rfc3339(state.end_time),
            exit_code: state.exit_code,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let job = self.find(&request.into_inner().uuid)?;
        let status = self
            .manager
            .cancel(&job)
            .await
            .map_err(CoreError::into_status)?;
        Ok(Response::new(CancelJobResponse {
            uuid: job.id.clone(),
            status: status.as_str().to_owned(),
        }))
    }

    async fn delete_job(
        &self,
        request: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let job = self.find(&request.into_inner().uuid)?;
        self.manager
            .delete(&job)
            .await
            .map_err(CoreError::into_status)?;
        Ok(Response::new(DeleteJobResponse {
            uuid: job.id.clone(),
            success: true,
            message: "job deleted".to_owned(),
        }))
    }

    async fn delete_all_jobs(
        &self,
        _: Request<DeleteAllJobsRequest>,
    ) -> Result<Response<DeleteAllJobsResponse>, Status> {
        let (mut deleted, mut skipped) = (0, 0);
        for job in self.manager.jobs() {
            match self.manager.delete(&job).await {
                Ok(()) => deleted += 1,
                Err(_) => skipped += 1,
            }
        }
        Ok(Response::new(DeleteAllJobsResponse {
            success: true,
            message: format!("deleted {deleted} jobs, skipped {skipped} running or scheduled"),
            deleted_count: deleted,
            skipped_count: skipped,
        }))
    }

    type GetJobLogsStream = ResponseStream<DataChunk>;

    async fn get_job_logs(
        &self,
        request: Request<GetJobLogsRequest>,
    ) -> Result<Response<Self::GetJobLogsStream>, Status> {
        let id = request.into_inner().uuid;
        let job = match self.find_or_history(&id)? {
            Found::Core(job) => job,
            Found::History(address) => {
                let mut lines = crate::history::logs(
                    &address,
                    QueryLogsRequest {
                        job_id: id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::NotFound | tonic::Code::Unavailable => {
                        Status::not_found(format!("job {id:?} not found"))
                    }
                    _ => status,
                })?;
                return Ok(Response::new(channel_stream(
                    self.manager.shutdown_token(),
                    |sender| async move {
                        loop {
                            let item = match lines.message().await {
                                // A gap marker: the compat stream has no way to say it.
                                Ok(Some(line)) if line.lost_lines > 0 => continue,
                                Ok(Some(line)) => Ok(DataChunk {
                                    payload: with_newline(&line.content, line.partial),
                                }),
                                Ok(None) => return,
                                Err(status) => Err(status),
                            };
                            if sender.send(item).await.is_err() {
                                return;
                            }
                        }
                    },
                )));
            }
        };
        let mut batches = log_records(job, 0, true)?;
        Ok(Response::new(channel_stream(
            self.manager.shutdown_token(),
            |sender| async move {
                while let Some(batch) = batches.recv().await {
                    let items: Vec<Result<DataChunk, Status>> = match batch {
                        Ok(records) => records
                            .into_iter()
                            .map(|r| {
                                Ok(DataChunk {
                                    payload: with_newline(&r.content, r.partial),
                                })
                            })
                            .collect(),
                        Err(status) => vec![Err(status)],
                    };
                    for item in items {
                        if sender.send(item).await.is_err() {
                            return;
                        }
                    }
                }
            },
        )))
    }

    async fn list_jobs(&self, _: Request<EmptyRequest>) -> Result<Response<Jobs>, Status> {
        let node_id = &self.manager.config().node_id;
        Ok(Response::new(Jobs {
            jobs: self
                .manager
                .jobs()
                .iter()
                .map(|job| job_message(job, node_id))
                .collect(),
        }))
    }

    type StreamJobMetricsStream = ResponseStream<JobMetricsEvent>;

    async fn stream_job_metrics(
        &self,
        request: Request<StreamJobMetricsRequest>,
    ) -> Result<Response<Self::StreamJobMetricsStream>, Status> {
        let job = self.find(&request.into_inner().job_uuid)?;
        let after = job.metrics.last_sequence();
        Ok(Response::new(follow_metrics(
            self.manager.shutdown_token(),
            job,
            after,
            true,
            |job, sample| sample_event(&job.id, sample),
        )))
    }

    type GetJobMetricsStream = ResponseStream<JobMetricsEvent>;

    async fn get_job_metrics(
        &self,
        request: Request<GetJobMetricsRequest>,
    ) -> Result<Response<Self::GetJobMetricsStream>, Status> {
        let request = request.into_inner();
        if request.start_time < 0 || request.end_time < 0 || request.limit < 0 {
            return Err(Status::invalid_argument(
                "start_time, end_time and limit must not be negative",
            ));
        }
        let job = match self.find_or_history(&request.job_uuid)? {
            Found::Core(job) => job,
            Found::History(address) => {
                let mut metrics = crate::history::metrics(
                    &address,
                    QueryMetricsRequest {
                        job_id: request.job_uuid.clone(),
                        start_time: request.start_time,
                        end_time: request.end_time,
                        limit: request.limit,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|_| Status::not_found(format!("job {:?} not found", request.job_uuid)))?;
                return Ok(Response::new(channel_stream(
                    self.manager.shutdown_token(),
                    |sender| async move {
                        while let Ok(Some(metric)) = metrics.message().await {
                            let Some(event) = metric.sample else { continue };
                            if sender.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    },
                )));
            }
        };
        let limit = if request.limit > 0 {
            request.limit as usize
        } else {
            usize::MAX
        };
        let events: Vec<Result<JobMetricsEvent, Status>> = job
            .metrics
            .after(0)
            .await
            .map_err(|e| Status::internal(format!("read metrics spool: {e}")))?
            .iter()
            .filter(|s| request.start_time == 0 || s.timestamp >= request.start_time)
            .filter(|s| request.end_time == 0 || s.timestamp < request.end_time)
            .take(limit)
            .map(|s| Ok(sample_event(&job.id, s)))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    type StreamLogsStream = ResponseStream<LogRecord>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let request = request.into_inner();
        let job = self.find(&request.job_uuid)?;
        let mut wanted = Vec::new();
        for stream in &request.streams {
            match LogStream::try_from(*stream) {
                Ok(LogStream::Stdout) | Ok(LogStream::Stderr) => wanted.push(*stream),
                _ => {
                    return Err(Status::invalid_argument(
                        "streams: use STDOUT and/or STDERR",
                    ));
                }
            }
        }
        let mut batches = log_records(job, request.after_sequence, request.follow)?;
        Ok(Response::new(channel_stream(
            self.manager.shutdown_token(),
            |sender| async move {
                while let Some(batch) = batches.recv().await {
                    let items: Vec<Result<LogRecord, Status>> = match batch {
                        Ok(records) => records
                            .into_iter()
                            .filter(|r| wanted.is_empty() || wanted.contains(&r.stream))
                            .map(Ok)
                            .collect(),
                        Err(status) => vec![Err(status)],
                    };
                    for item in items {
                        if sender.send(item).await.is_err() {
                            return;
                        }
                    }
                }
            },
        )))
    }

    type StreamMetricsStream = ResponseStream<MetricRecord>;

    async fn stream_metrics(
        &self,
        request: Request<StreamMetricsRequest>,
    ) -> Result<Response<Self::StreamMetricsStream>, Status> {
        let request = request.into_inner();
        let job = self.find(&request.job_uuid)?;
        Ok(Response::new(follow_metrics(
            self.manager.shutdown_token(),
            job,
            request.after_sequence,
            request.follow,
            |job, sample| MetricRecord {
                sequence: sample.sequence,
                sample: Some(sample_event(&job.id, sample)),
            },
        )))
    }
}

/// A record as the job wrote it: its content and, unless partial, the newline after it.
fn with_newline(content: &[u8], partial: bool) -> bytes::Bytes {
    let mut payload = Vec::with_capacity(content.len() + 1);
    payload.extend_from_slice(content);
    if !partial {
        payload.push(b'\n');
    }
    payload.into()
}

/// Samples after `after`, then (if `follow`) new ones until the job ends.
fn follow_metrics<T: Send + 'static>(
    shutdown: &CancellationToken,
    job: Arc<Job>,
    mut after: u64,
    follow: bool,
    convert: fn(&Job, &Sample) -> T,
) -> ResponseStream<T> {
    channel_stream(shutdown, move |sender| async move {
        let mut progress = job.metrics.subscribe();
        loop {
            let finished = progress.borrow_and_update().finished;
            let samples = match job.metrics.after(after).await {
                Ok(samples) => samples,
                Err(error) => {
                    let _ = sender
                        .send(Err(Status::internal(format!(
                            "read metrics spool: {error}"
                        ))))
                        .await;
                    return;
                }
            };
            for sample in samples {
                after = sample.sequence;
                if sender.send(Ok(convert(&job, &sample))).await.is_err() {
                    return;
                }
            }
            if finished || !follow || progress.changed().await.is_err() {
                return;
            }
        }
    })
}

pub struct MonitoringApi {
    manager: Arc<JobManager>,
    system: Mutex<sysinfo::System>,
}

impl MonitoringApi {
    pub fn new(manager: Arc<JobManager>) -> Self {
        MonitoringApi {
            manager,
            system: Mutex::new(sysinfo::System::new()),
        }
    }
}

#[tonic::async_trait]
impl MonitoringService for MonitoringApi {
    async fn get_system_status(
        &self,
        _: Request<EmptyRequest>,
    ) -> Result<Response<SystemStatusResponse>, Status> {
        let (cpu, memory) = {
            let mut system = joblet_daemon::lock(&self.system);
            system.refresh_cpu_usage();
            system.refresh_memory();
            let total = system.total_memory() as i64;
            let available = system.available_memory() as i64;
            let load = sysinfo::System::load_average();
            (
                CpuMetrics {
                    cores: system.cpus().len() as i32,
                    usage_percent: f64::from(system.global_cpu_usage()),
                    load_average: vec![load.one, load.five, load.fifteen],
                },
                MemoryMetrics {
                    total_bytes: total,
                    used_bytes: system.used_memory() as i64,
                    free_bytes: system.free_memory() as i64,
                    available_bytes: available,
                    usage_percent: if total > 0 {
                        (total - available) as f64 / total as f64 * 100.0
                    } else {
                        0.0
                    },
                },
            )
        };
        let boot = sysinfo::System::boot_time();
        let config = self.manager.config();
        Ok(Response::new(SystemStatusResponse {
            timestamp: rfc3339(Some(chrono::Utc::now())),
            available: true,
            host: Some(HostInfo {
                hostname: sysinfo::System::host_name().unwrap_or_default(),
                os: sysinfo::System::long_os_version().unwrap_or_default(),
                kernel_version: sysinfo::System::kernel_version().unwrap_or_default(),
                architecture: std::env::consts::ARCH.to_owned(),
                boot_time: rfc3339(chrono::DateTime::from_timestamp(boot as i64, 0)),
                uptime: sysinfo::System::uptime() as i64,
                node_id: config.node_id.clone(),
            }),
            cpu: Some(cpu),
            memory: Some(memory),
            server_version: Some(ServerVersionInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                component: "joblet-core".to_owned(),
                platform: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
                ..Default::default()
            }),
            persist_connected: self
                .manager
                .replication()
                .is_some_and(|sender| sender.is_connected()),
        }))
    }
}
