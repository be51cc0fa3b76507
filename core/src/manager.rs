//! The job manager: registers jobs, runs each through its life, stops, cancels and deletes
//! them, and cleans everything up at shutdown (no leaked processes or cgroups).
//!
//! Each running job has three threads (stdout pump, stderr pump, waiter) and two tasks
//! (metrics sampler, supervisor). The supervisor marks the job finished only after both pipes
//! reached end of file, so the output of a job that exits at once is always complete.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use joblet_ipc::{IpcSender, MetricData};
use joblet_proto::joblet::{LogStream, RunJobRequest};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cgroup::{CgroupRoot, Limits};
use crate::config::Config;
use crate::error::CoreError;
use crate::job::{EndRequest, Job, Status};
use crate::metrics as m;
use crate::metrics_log::MetricsLog;
use crate::output::{self, Output};
use crate::replicate::Replication;
use crate::spawn::{SpawnSpec, spawn};
use crate::spec::JobSpec;

/// How long shutdown waits for killed jobs to finish their output.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown then waits for persist to acknowledge what is not yet replicated.
const REPLICATION_DRAIN_WAIT: Duration = Duration::from_secs(30);

pub struct JobManager {
    config: Config,
    cgroups: CgroupRoot,
    replication: Option<Arc<Replication>>,
    jobs: RwLock<HashMap<String, Arc<Job>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    spool_dir: PathBuf,
}

impl JobManager {
    pub fn new(
        config: Config,
        cgroups: CgroupRoot,
        replication: Option<Arc<Replication>>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Arc<JobManager>> {
        let spool_dir = config.state_dir.join("spool");
        // Spools of a previous run belong to jobs that no longer exist here; their history
        // is in joblet-persist.
        if spool_dir.exists() {
            std::fs::remove_dir_all(&spool_dir)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spool_dir)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&config.jobs.work_root)?;
        let manager = Arc::new(JobManager {
            config,
            cgroups,
            replication,
            jobs: RwLock::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown,
            spool_dir,
        });
        manager.publish_job_gauges();
        Ok(manager)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn replication(&self) -> Option<&IpcSender> {
        self.replication.as_deref().map(Replication::sender)
    }

    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let jobs = self.jobs.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<Arc<Job>> = jobs.values().cloned().collect();
        list.sort_by_key(|job| job.created);
        list
    }

    /// Finds a job by full id or unique prefix.
    pub fn find(&self, id_or_prefix: &str) -> Result<Arc<Job>, CoreError> {
        if id_or_prefix.is_empty() {
            return Err(CoreError::InvalidArgument {
                field: "uuid",
                message: "must not be empty".into(),
            });
        }
        if id_or_prefix.len() > 36
            || !id_or_prefix
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(CoreError::InvalidArgument {
                field: "uuid",
                message: format!(
                    "{:?} is not a job id (a UUID or a prefix of one)",
                    id_or_prefix.chars().take(64).collect::<String>()
                ),
            });
        }
        let jobs = self.jobs.read().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = jobs.get(id_or_prefix) {
            return Ok(job.clone());
        }
        let matches: Vec<&Arc<Job>> = jobs
            .iter()
            .filter(|(id, _)| id.starts_with(id_or_prefix))
            .map(|(_, job)| job)
            .collect();
        match matches.as_slice() {
            [] => Err(CoreError::NotFound(id_or_prefix.to_owned())),
            [job] => Ok((*job).clone()),
            many => Err(CoreError::Ambiguous {
                prefix: id_or_prefix.to_owned(),
                count: many.len(),
            }),
        }
    }

    /// Validates and registers a job, and starts it now or at its scheduled time.
    pub fn run(self: &Arc<Self>, request: RunJobRequest) -> Result<Arc<Job>, CoreError> {
        if self.shutdown.is_cancelled() {
            return Err(CoreError::FailedPrecondition(
                "joblet-core is shutting down".into(),
            ));
        }
        let spec = JobSpec::from_request(request, &self.config.jobs)?;
        if let Some(dir) = &spec.work_dir {
            refuse_symlinks(dir, &spec.uploads)?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let work_dir = spec
            .work_dir
            .clone()
            .unwrap_or_else(|| self.config.jobs.work_root.join(&id));
        let spool = self.spool_dir.join(format!("{id}.log"));
        let output = Output::create(&id, &spool)
            .map_err(|e| CoreError::Internal(format!("create spool {}: {e}", spool.display())))?;
        let metrics = Arc::new(MetricsLog::new());
        let job = Arc::new(Job::new(id.clone(), spec, work_dir, output, metrics));
        if let Some(replication) = &self.replication {
            replication.watch(&job);
        }
        self.jobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, job.clone());
        self.publish_job_gauges();
        let manager = self.clone();
        let supervised = job.clone();
        self.tasks
            .spawn(async move { manager.supervise(supervised).await });
        Ok(job)
    }

    async fn supervise(self: Arc<Self>, job: Arc<Job>) {
        if let Some(at) = job.spec.schedule {
            let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = job.cancel.cancelled() => return self.finish_unstarted(&job, Status::Canceled, "canceled before its scheduled start"),
                () = self.shutdown.cancelled() => return self.finish_unstarted(&job, Status::Canceled, "joblet-core shut down before the scheduled start"),
            }
            job.update(|s| s.status = Status::Initializing);
            self.publish_job_gauges();
        }
        let started = {
            let manager = self.clone();
            let job = job.clone();
            tokio::task::spawn_blocking(move || manager.start_process(&job)).await
        };
        let child = match started {
            Ok(Ok(child)) => child,
            Ok(Err(error)) => {
                tracing::warn!(job_id = %job.id, %error, "job failed to start");
                metrics::counter!(m::JOB_FAILURES).increment(1);
                return self.finish_unstarted(&job, Status::Failed, &error.to_string());
            }
            Err(error) => {
                return self.finish_unstarted(
                    &job,
                    Status::Failed,
                    &format!("start task failed: {error}"),
                );
            }
        };
        metrics::counter!(m::JOBS_STARTED).increment(1);
        self.watch_running(job, child).await;
    }

    /// Work dir, uploads, cgroup, process. Blocking: runs on the blocking pool.
    fn start_process(&self, job: &Job) -> Result<std::process::Child, CoreError> {
        let spec = &job.spec;
        let failed =
            |what: &str, e: &dyn std::fmt::Display| CoreError::Internal(format!("{what}: {e}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&job.work_dir)
            .map_err(|e| failed(&format!("create work dir {}", job.work_dir.display()), &e))?;
        write_uploads(&job.work_dir, &spec.uploads)?;

        let limits = Limits {
            cpu_percent: (spec.max_cpu > 0).then_some(spec.max_cpu),
            memory_bytes: (spec.max_memory_mb > 0)
                .then(|| i64::from(spec.max_memory_mb) * 1024 * 1024),
            io_bytes_per_second: (spec.max_io_bps > 0).then_some(spec.max_io_bps),
            cpuset: (!spec.cpu_cores.is_empty()).then(|| spec.cpu_cores.clone()),
            pids: self.config.cgroup.pids_limit,
        };
        let cgroup = Arc::new(
            self.cgroups
                .create(&job.id, &limits)
                .map_err(|e| failed("cgroup", &e))?,
        );
        *job.cgroup.lock().unwrap_or_else(|e| e.into_inner()) = Some(cgroup.clone());

        let mut environment: Vec<(String, String)> = spec
            .environment
            .iter()
            .chain(spec.secret_environment.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        environment.push(("JOBLET_JOB_ID".into(), job.id.clone()));
        let spawn_spec = SpawnSpec {
            command: spec.command.clone(),
            args: spec.args.clone(),
            environment,
            work_dir: job.work_dir.clone(),
            hostname: format!("job-{}", &job.id[..8]),
            network: spec.network,
            cgroup_procs: cgroup.procs_files(),
        };
        let mut child = spawn(&spawn_spec).map_err(|e| {
            cgroup.kill_all();
            cgroup.delete();
            failed(&format!("start {:?}", spec.command), &e)
        })?;
        job.update(|s| {
            s.status = Status::Running;
            s.start_time = Some(Utc::now());
        });
        self.publish_job_gauges();
        tracing::info!(job_id = %job.id, command = %spec.command, pid = child.id(), "job started");

        let max_line = self.config.jobs.max_line_length.as_u64() as usize;
        for (stream, pipe) in [
            (LogStream::Stdout, child.stdout.take().map(output_pipe)),
            (LogStream::Stderr, child.stderr.take().map(output_pipe)),
        ] {
            let Some(pipe) = pipe else { continue };
            let output = job.output.clone();
            let pumps = job.pumps.clone();
            let handle = std::thread::Builder::new()
                .name(format!("pump-{}", &job.id[..8]))
                .spawn(move || output::pump(&output, stream, pipe, max_line))
                .map_err(|e| failed("start output thread", &e))?;
            pumps.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
        }
        Ok(child)
    }

    async fn watch_running(self: Arc<Self>, job: Arc<Job>, mut child: std::process::Child) {
        let sampler = tokio::spawn(sample_metrics(
            job.clone(),
            self.config.jobs.metrics_interval,
        ));
        let waiter = tokio::task::spawn_blocking(move || child.wait());
        let timeout = job.spec.timeout;
        let ended = async {
            let mut waiter = waiter;
            match timeout {
                None => waiter.await,
                Some(limit) => tokio::select! {
                    result = &mut waiter => result,
                    () = tokio::time::sleep(limit) => {
                        tracing::info!(job_id = %job.id, "job timed out");
                        self.end_running(&job, EndRequest::Timeout, self.config.jobs.stop_grace_period).await;
                        waiter.await
                    }
                },
            }
        };
        let exit = ended.await;
        // Output is complete only when both pipes are closed.
        let pumps: Vec<_> =
            std::mem::take(&mut *job.pumps.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for pump in pumps {
                let _ = pump.join();
            }
        })
        .await;
        sampler.abort();
        let cgroup = job.cgroup();
        let usage = cgroup.as_ref().map(|c| c.usage()).unwrap_or_default();
        if let Some(cgroup) = cgroup {
            let _ = tokio::task::spawn_blocking(move || {
                cgroup.kill_all();
                cgroup.delete();
            })
            .await;
        }
        let exit_code = match exit {
            Ok(Ok(status)) => exit_code_of(status),
            Ok(Err(error)) => {
                tracing::error!(job_id = %job.id, %error, "waiting for job failed");
                -1
            }
            Err(error) => {
                tracing::error!(job_id = %job.id, %error, "job waiter failed");
                -1
            }
        };
        let (status, reason) = match job.end_request() {
            Some(EndRequest::Stop) => (Status::Stopped, "stopped by request".to_owned()),
            Some(EndRequest::Shutdown) => (Status::Stopped, "joblet-core shut down".to_owned()),
            Some(EndRequest::Timeout) => (
                Status::Failed,
                format!("timed out after {}", job.spec.timeout_text),
            ),
            None if usage.oom_kills > 0 => (
                Status::Failed,
                format!(
                    "out of memory: killed for exceeding max_memory {} MiB",
                    job.spec.max_memory_mb
                ),
            ),
            None if exit_code == 0 => (Status::Completed, String::new()),
            None if exit_code > 128 => (
                Status::Failed,
                format!("killed by signal {}", exit_code - 128),
            ),
            None => (Status::Failed, format!("exited with code {exit_code}")),
        };
        if status == Status::Failed {
            metrics::counter!(m::JOB_FAILURES).increment(1);
        }
        job.metrics.finish();
        job.output.finish();
        job.update(|s| {
            s.status = status;
            s.exit_code = exit_code;
            s.end_time = Some(Utc::now());
            s.reason = reason;
        });
        self.publish_job_gauges();
        tracing::info!(job_id = %job.id, status = status.as_str(), exit_code, "job ended");
    }

    fn finish_unstarted(&self, job: &Job, status: Status, reason: &str) {
        job.output.finish();
        job.metrics.finish();
        job.update(|s| {
            s.status = status;
            s.end_time = Some(Utc::now());
            s.reason = reason.to_owned();
            s.exit_code = if status == Status::Failed { -1 } else { 0 };
        });
        self.publish_job_gauges();
    }

    /// SIGTERM to every process of the job, SIGKILL after `grace`.
    async fn end_running(&self, job: &Job, request: EndRequest, grace: Duration) {
        job.request_end(request);
        let Some(cgroup) = job.cgroup() else { return };
        let signalled = cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || {
            signalled.signal_all(nix::sys::signal::Signal::SIGTERM);
        })
        .await;
        if tokio::time::timeout(grace, job.wait_terminal())
            .await
            .is_err()
        {
            let _ = tokio::task::spawn_blocking(move || cgroup.kill_all()).await;
        }
    }

    /// Stops a running job (SIGTERM, then SIGKILL after `grace`) or cancels a scheduled one,
    /// and returns once it has ended.
    pub async fn stop(&self, job: &Arc<Job>, grace: Option<Duration>) -> Result<Status, CoreError> {
        match job.status() {
            Status::Scheduled => {
                job.cancel.cancel();
            }
            Status::Initializing | Status::Running => {
                let grace = grace.unwrap_or(self.config.jobs.stop_grace_period);
                self.end_running(job, EndRequest::Stop, grace).await;
            }
            status => {
                return Err(CoreError::FailedPrecondition(format!(
                    "job {} already ended ({})",
                    job.id,
                    status.as_str()
                )));
            }
        }
        Ok(job.wait_terminal().await)
    }

    pub async fn cancel(&self, job: &Arc<Job>) -> Result<Status, CoreError> {
        if job.status() != Status::Scheduled {
            return Err(CoreError::FailedPrecondition(format!(
                "job {} is {}, only scheduled jobs can be canceled (use stop)",
                job.id,
                job.status().as_str()
            )));
        }
        job.cancel.cancel();
        Ok(job.wait_terminal().await)
    }

    /// Removes an ended job: its spool, the work dir joblet made for it, and (best effort)
    /// its history in joblet-persist.
    pub async fn delete(&self, job: &Arc<Job>) -> Result<(), CoreError> {
        let status = job.status();
        if !status.is_terminal() {
            return Err(CoreError::FailedPrecondition(format!(
                "job {} is {}; stop or cancel it first",
                job.id,
                status.as_str()
            )));
        }
        self.jobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.id);
        job.deleted.store(true, Ordering::Relaxed);
        let spool = self.spool_dir.join(format!("{}.log", job.id));
        let _ = std::fs::remove_file(spool);
        if job.spec.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&job.work_dir);
        }
        if let Some(sender) = self.replication() {
            sender.forget_job(&job.id);
        }
        if let Some(target) = self.config.persist.query_target()
            && let Err(error) = crate::history::delete(&target, &job.id).await
        {
            tracing::warn!(job_id = %job.id, %error, "could not delete the job's history in joblet-persist");
        }
        self.publish_job_gauges();
        Ok(())
    }

    /// Ends everything at shutdown: cancels scheduled jobs, kills running ones, waits for their
    /// output, removes their cgroups.
    pub async fn shutdown(&self) {
        let jobs = self.jobs();
        for job in &jobs {
            match job.status() {
                Status::Scheduled => job.cancel.cancel(),
                Status::Initializing | Status::Running => {
                    job.request_end(EndRequest::Shutdown);
                    if let Some(cgroup) = job.cgroup() {
                        let _ = tokio::task::spawn_blocking(move || cgroup.kill_all()).await;
                    }
                }
                _ => {}
            }
        }
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some jobs did not finish within the shutdown wait");
        }
        if let Some(replication) = &self.replication {
            replication.drain(REPLICATION_DRAIN_WAIT).await;
        }
        self.cgroups.remove_parent();
    }

    fn publish_job_gauges(&self) {
        let mut counts: HashMap<Status, usize> = HashMap::new();
        for job in self.jobs.read().unwrap_or_else(|e| e.into_inner()).values() {
            *counts.entry(job.status()).or_default() += 1;
        }
        for status in Status::ALL {
            metrics::gauge!(m::JOBS, "state" => status.as_str())
                .set(counts.get(&status).copied().unwrap_or(0) as f64);
        }
    }
}

/// Pipe capacity asked for the job's stdout and stderr (Linux's default limit for
/// unprivileged processes): the job can write on while its pump thread waits for a CPU.
const PIPE_BYTES: i32 = 1024 * 1024;

/// The read end of a job's output pipe as a file, enlarged to [`PIPE_BYTES`] when the kernel
/// allows.
fn output_pipe(pipe: impl Into<std::os::fd::OwnedFd>) -> std::fs::File {
    let file = std::fs::File::from(pipe.into());
    if let Err(error) = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)) {
        tracing::debug!(%error, "cannot enlarge the output pipe");
    }
    file
}

/// The waiter already maps signal deaths to 128+N; a waiter killed itself shows as a signal.
fn exit_code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Refuses uploads that would be written through a symlink in the work dir (which could
/// point anywhere on the host).
fn refuse_symlinks(work_dir: &Path, uploads: &[crate::spec::Upload]) -> Result<(), CoreError> {
    for upload in uploads {
        let mut checked = work_dir.to_path_buf();
        for component in upload.path.components() {
            checked.push(component);
            if std::fs::symlink_metadata(&checked).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(CoreError::InvalidArgument {
                    field: "uploads",
                    message: format!("{} goes through a symlink", upload.path.display()),
                });
            }
        }
    }
    Ok(())
}

fn write_uploads(work_dir: &Path, uploads: &[crate::spec::Upload]) -> Result<(), CoreError> {
    // Checked again here: the work dir may have changed since the request was accepted.
    refuse_symlinks(work_dir, uploads)?;
    for upload in uploads {
        let target = work_dir.join(&upload.path);
        let io = |e: std::io::Error| {
            CoreError::Internal(format!("upload {}: {e}", upload.path.display()))
        };
        if upload.is_directory {
            std::fs::create_dir_all(&target).map_err(io)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&target, &upload.content).map_err(io)?;
        let mode = if upload.mode == 0 { 0o644 } else { upload.mode };
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}

/// Samples the job's cgroup every `interval` until aborted.
async fn sample_metrics(job: Arc<Job>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<(Instant, u64)> = None;
    loop {
        ticker.tick().await;
        let Some(cgroup) = job.cgroup() else { continue };
        let Ok(usage) = tokio::task::spawn_blocking(move || cgroup.usage()).await else {
            continue;
        };
        let now = Instant::now();
        let cpu_percent = match previous {
            Some((at, cpu)) => {
                let wall = now.duration_since(at).as_nanos().max(1) as f64;
                usage.cpu_nanos.saturating_sub(cpu) as f64 / wall * 100.0
            }
            None => 0.0,
        };
        previous = Some((now, usage.cpu_nanos));
        let limit = if usage.memory_limit <= 0 || usage.memory_limit >= i64::MAX / 2 {
            0
        } else {
            usage.memory_limit
        };
        job.metrics.push(
            output::now_ns(),
            MetricData {
                cpu_percent,
                memory_bytes: usage.memory_bytes as i64,
                memory_limit: limit,
                io_read_bytes: usage.io_read_bytes as i64,
                io_write_bytes: usage.io_write_bytes as i64,
                pids: usage.pids as i64,
                ..Default::default()
            },
        );
    }
}
