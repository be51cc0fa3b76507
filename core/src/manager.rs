//! The job manager: registers jobs, runs each through its life, stops, cancels and deletes
//! them, restores them at start, evicts finished ones, and cleans everything up at shutdown
//! (no leaked processes or cgroups).
//!
//! Each running job has a supervisor process ([`crate::supervisor`]) that owns it and writes
//! its spool, and two tasks in core: the metrics sampler and a watcher that waits for the
//! supervisor to exit (through a pidfd), enforces the job's timeout and records its end from
//! the exit status the supervisor left in `<id>.exit`. The supervisor exits only after both
//! pipes reached end of file, so the output of a job that exits at once is always complete.
//!
//! Running jobs survive core: with `jobs.on_core_shutdown: keep` (the default) a shutdown leaves
//! them to their supervisors, and at the next start each is re-attached (its supervisor checked
//! by pid, start time and boot, its cgroup, spool, sampler, timeout and stop taken up again). A
//! job whose supervisor is gone ends FAILED "lost: …" unless the supervisor recorded its exit.
//!
//! Survival across restarts: every job is in core's journal ([`crate::state`]) and its output
//! in its spools under `state_dir/spool`. At start the journal is read back: finished jobs are
//! listed and readable as before, replication resumes for each job persist has not
//! acknowledged in full, running jobs are re-attached, and scheduled jobs are scheduled again. A spool without a record is
//! kept too, as a FAILED job of unknown command. A spool is deleted only when persist has
//! acknowledged all of it and the job ended more than `jobs.keep_finished` ago — or, with
//! persist disabled, when spools exceed `jobs.spool_max_bytes` (oldest finished jobs first).
//! A finished job costs its record in memory (no open file, no buffers).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use joblet_ipc::IpcSender;
use joblet_proto::joblet::RunJobRequest;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cgroup::{CgroupRoot, Limits};
use crate::config::{Config, OnCoreShutdown};
use crate::error::CoreError;
use crate::job::{EndRequest, Job, JobParts, Status, Transition};
use crate::metrics as m;
use crate::metrics_log::MetricsLog;
use crate::output::{Output, SpoolWatch};
use crate::replicate::Replication;
use crate::sampler::sample_metrics;
use crate::spawn::SpawnSpec;
use crate::spec::JobSpec;
use crate::state::{Journal, StoredJob};
use crate::supervisor::{self, Launch, Supervisor};
use crate::uploads::{refuse_symlinks, write_uploads};

/// How long shutdown waits for killed jobs to finish their output.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown then waits for persist to acknowledge what is not yet replicated.
const REPLICATION_DRAIN_WAIT: Duration = Duration::from_secs(30);
/// Longest pause between two eviction passes.
const EVICTION_INTERVAL: Duration = Duration::from_secs(10);

pub struct JobManager {
    config: Config,
    cgroups: CgroupRoot,
    replication: Option<Arc<Replication>>,
    journal: Arc<Journal>,
    jobs: RwLock<HashMap<String, Arc<Job>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    spool_dir: PathBuf,
    /// Follows the spools of running jobs as their supervisors write them.
    spools: Arc<SpoolWatch>,
}

fn log_spool(spool_dir: &Path, id: &str) -> PathBuf {
    spool_dir.join(format!("{id}.log"))
}

fn metrics_spool(spool_dir: &Path, id: &str) -> PathBuf {
    spool_dir.join(format!("{id}.metrics"))
}

/// Where a job's supervisor records how the job ended.
fn exit_file(spool_dir: &Path, id: &str) -> PathBuf {
    spool_dir.join(format!("{id}.exit"))
}

/// Jobs read back from the journal and the spool directory, before they are started again.
struct Restored {
    journal: Arc<Journal>,
    jobs: Vec<Arc<Job>>,
}

impl JobManager {
    /// Opens core's state: the journal and the spools of earlier runs (nothing is deleted),
    /// then restores every job (see the module docs).
    pub async fn open(
        config: Config,
        cgroups: CgroupRoot,
        replication: Option<Arc<Replication>>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<JobManager>> {
        use anyhow::Context;
        let spool_dir = config.state_dir.join("spool");
        let state_dir = config.state_dir.clone();
        let work_root = config.jobs.work_root.clone();
        let restored = {
            let spool_dir = spool_dir.clone();
            tokio::task::spawn_blocking(move || {
                for (dir, mode) in [
                    (&state_dir, 0o700),
                    (&spool_dir, 0o700),
                    (&work_root, 0o755),
                ] {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(mode)
                        .create(dir)
                        .with_context(|| format!("create {}", dir.display()))?;
                }
                restore(&state_dir, &spool_dir)
            })
            .await??
        };
        let spools = SpoolWatch::start(&spool_dir)
            .with_context(|| format!("watch {}", spool_dir.display()))?;
        let manager = Arc::new(JobManager {
            config,
            cgroups,
            replication,
            journal: restored.journal,
            jobs: RwLock::new(
                restored
                    .jobs
                    .iter()
                    .map(|job| (job.id.clone(), job.clone()))
                    .collect(),
            ),
            tasks: TaskTracker::new(),
            shutdown,
            spool_dir,
            spools,
        });
        manager.resume(restored.jobs).await;
        manager.publish_job_gauges();
        let evictor = manager.clone();
        tokio::spawn(async move { evictor.evict_finished().await });
        Ok(manager)
    }

    /// Re-attaches running jobs, ends what cannot be re-attached, schedules scheduled jobs again
    /// and resumes replication.
    async fn resume(self: &Arc<Self>, jobs: Vec<Arc<Job>>) {
        let (mut resumed, mut reattached) = (0, 0);
        for job in jobs {
            match job.status() {
                Status::Scheduled if resumable(&job.spec) => {
                    let manager = self.clone();
                    let supervised = job.clone();
                    self.tasks
                        .spawn(async move { manager.supervise(supervised).await });
                }
                Status::Scheduled => {
                    let _ = job.transition(Transition::Ended {
                        status: Status::Canceled,
                        exit_code: 0,
                        reason: "joblet-core restarted before the scheduled start, and the job's uploads or secret values are not kept on disk".into(),
                    }).await;
                }
                Status::Running => {
                    let supervisor = job
                        .state()
                        .supervisor
                        .as_ref()
                        .and_then(Supervisor::reattach);
                    let cgroups = self.cgroups.clone();
                    let id = job.id.clone();
                    let cgroup = tokio::task::spawn_blocking(move || cgroups.open(&id))
                        .await
                        .ok()
                        .flatten();
                    *joblet_daemon::lock(&job.cgroup) = cgroup.map(Arc::new);
                    if let Some(supervisor) = &supervisor {
                        tracing::info!(job_id = %job.id, supervisor = supervisor.id.pid, "running job re-attached");
                        self.spools.follow(&job.output);
                        reattached += 1;
                    }
                    // Without a supervisor it ends at once, from its exit file if it has one.
                    let manager = self.clone();
                    let watched = job.clone();
                    self.tasks
                        .spawn(async move { manager.watch_running(watched, supervisor).await });
                }
                Status::Initializing => {
                    // Core stopped while starting it: whatever started is not recorded.
                    let cgroups = self.cgroups.clone();
                    let id = job.id.clone();
                    let _ = tokio::task::spawn_blocking(move || cgroups.remove_leftover(&id)).await;
                    let _ = job
                        .transition(Transition::Ended {
                            status: Status::Failed,
                            exit_code: -1,
                            reason: "lost: joblet-core stopped while starting the job".into(),
                        })
                        .await;
                    job.output.finish();
                    job.metrics.finish();
                }
                _ => {}
            }
            if let Some(replication) = &self.replication
                && !replication.is_complete(&job)
            {
                replication.resume(&job);
                resumed += 1;
            }
        }
        metrics::counter!(m::JOBS_REATTACHED).increment(reattached);
        if reattached > 0 {
            tracing::info!(jobs = reattached, "running jobs re-attached");
        }
        if resumed > 0 {
            tracing::info!(
                jobs = resumed,
                "resuming replication of jobs joblet-persist has not acknowledged in full"
            );
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Cancelled when core shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn replication(&self) -> Option<&IpcSender> {
        self.replication.as_deref().map(Replication::sender)
    }

    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let jobs = joblet_daemon::read(&self.jobs);
        let mut list: Vec<Arc<Job>> = jobs.values().cloned().collect();
        list.sort_by_key(|job| job.created);
        list
    }

    /// Finds a job by full id or unique prefix.
    pub fn find(&self, id_or_prefix: &str) -> Result<Arc<Job>, CoreError> {
        check_id(id_or_prefix)?;
        let jobs = joblet_daemon::read(&self.jobs);
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

    /// Validates and registers a job, records it durably, and starts it now or at its
    /// scheduled time.
    pub async fn run(self: &Arc<Self>, request: RunJobRequest) -> Result<Arc<Job>, CoreError> {
        if self.shutdown.is_cancelled() {
            return Err(CoreError::FailedPrecondition(
                "joblet-core is shutting down".into(),
            ));
        }
        let spec = JobSpec::from_request(request, &self.config.jobs)?;
        let id = uuid::Uuid::new_v4().to_string();
        let work_dir = spec
            .work_dir
            .clone()
            .unwrap_or_else(|| self.config.jobs.work_root.join(&id));
        let (spec, output, metrics) = {
            let logs = log_spool(&self.spool_dir, &id);
            let samples = metrics_spool(&self.spool_dir, &id);
            let id = id.clone();
            blocking(move || {
                if let Some(dir) = &spec.work_dir {
                    refuse_symlinks(dir, &spec.uploads)?;
                }
                let failed = |path: &Path, e: std::io::Error| {
                    CoreError::Internal(format!("create spool {}: {e}", path.display()))
                };
                let output = Output::create(&id, &logs).map_err(|e| failed(&logs, e))?;
                let metrics = MetricsLog::create(&samples).map_err(|e| {
                    let _ = std::fs::remove_file(&logs);
                    failed(&samples, e)
                })?;
                Ok((spec, output, metrics))
            })
            .await?
        };
        let job = Arc::new(Job::new(
            id.clone(),
            spec,
            work_dir,
            JobParts {
                output,
                metrics,
                journal: self.journal.clone(),
            },
        ));
        if let Err(error) = job.record_new().await {
            self.remove_spools(&job).await;
            return Err(error);
        }
        if let Some(replication) = &self.replication {
            replication.watch(&job);
        }
        joblet_daemon::write(&self.jobs).insert(id, job.clone());
        self.publish_job_gauges();
        let manager = self.clone();
        let supervised = job.clone();
        self.tasks
            .spawn(async move { manager.supervise(supervised).await });
        Ok(job)
    }

    #[tracing::instrument(name = "job", skip_all, fields(job_id = %job.id))]
    async fn supervise(self: Arc<Self>, job: Arc<Job>) {
        if let Some(at) = job.spec.schedule {
            let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = job.cancel.cancelled() => return self.finish_unstarted(&job, Status::Canceled, "canceled before its scheduled start").await,
                // It stays scheduled in the journal and is scheduled again at the next start,
                // unless what it needs is not on disk.
                () = self.shutdown.cancelled() => {
                    if !resumable(&job.spec) {
                        self.finish_unstarted(&job, Status::Canceled, "joblet-core shut down before the scheduled start, and the job's uploads or secret values are not kept on disk").await;
                    }
                    return;
                }
            }
            if job.transition(Transition::Initializing).await.is_err() {
                return;
            }
            self.publish_job_gauges();
        }
        let started = {
            let manager = self.clone();
            let job = job.clone();
            tokio::task::spawn_blocking(move || manager.start_process(&job)).await
        };
        let supervisor = match started {
            Ok(Ok(supervisor)) => supervisor,
            Ok(Err(error)) => {
                tracing::warn!(job_id = %job.id, %error, "job failed to start");
                metrics::counter!(m::JOB_FAILURES).increment(1);
                return self
                    .finish_unstarted(&job, Status::Failed, &error.to_string())
                    .await;
            }
            Err(error) => {
                return self
                    .finish_unstarted(&job, Status::Failed, &format!("start task failed: {error}"))
                    .await;
            }
        };
        let _ = job
            .transition(Transition::Running {
                supervisor: supervisor.id.clone(),
            })
            .await;
        self.publish_job_gauges();
        tracing::info!(job_id = %job.id, command = %job.spec.command, supervisor = supervisor.id.pid, "job started");
        metrics::counter!(m::JOBS_STARTED).increment(1);
        self.watch_running(job, Some(supervisor)).await;
    }

    /// Work dir, uploads, cgroup, then the job's supervisor, which starts the job. Blocking:
    /// runs on the blocking pool.
    fn start_process(&self, job: &Job) -> Result<Supervisor, CoreError> {
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
        *joblet_daemon::lock(&job.cgroup) = Some(cgroup.clone());

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
        let launch = Launch {
            job_id: job.id.clone(),
            spawn: spawn_spec,
            spool: job.output.path().to_owned(),
            exit_file: exit_file(&self.spool_dir, &job.id),
            max_line: self.config.jobs.max_line_length.as_u64() as usize,
        };
        self.spools.follow(&job.output);
        Supervisor::launch(&launch).map_err(|error| {
            cgroup.kill_all();
            cgroup.delete();
            CoreError::Internal(error)
        })
    }

    /// Watches a running job until it ends, then records how it ended. `None`: a job whose
    /// supervisor was not found at start, ended from its exit file or as lost.
    #[tracing::instrument(name = "job_watch", skip_all, fields(job_id = %job.id))]
    async fn watch_running(self: Arc<Self>, job: Arc<Job>, supervisor: Option<Supervisor>) {
        let attached = supervisor.is_some();
        let sampler = tokio::spawn(sample_metrics(
            job.clone(),
            self.config.jobs.metrics_interval,
        ));
        let exited = async {
            if let Some(supervisor) = supervisor {
                supervisor.exited().await;
            }
        };
        // Counted from the start, so that a re-attached job keeps its deadline.
        let remaining = job.spec.timeout.map(|limit| {
            let ran = job
                .state()
                .start_time
                .and_then(|start| (Utc::now() - start).to_std().ok())
                .unwrap_or_default();
            limit.saturating_sub(ran)
        });
        let ended = async {
            tokio::pin!(exited);
            if let Some(remaining) = remaining {
                tokio::select! {
                    () = &mut exited => return,
                    () = tokio::time::sleep(remaining) => {}
                }
                tracing::info!(job_id = %job.id, "job timed out");
                job.request_end(EndRequest::Timeout);
                if let Some(cgroup) = job.cgroup() {
                    let _ = tokio::task::spawn_blocking(move || {
                        cgroup.signal_all(nix::sys::signal::Signal::SIGTERM);
                    })
                    .await;
                }
                tokio::select! {
                    () = &mut exited => return,
                    () = tokio::time::sleep(self.config.jobs.stop_grace_period) => {}
                }
                if let Some(cgroup) = job.cgroup() {
                    let _ = tokio::task::spawn_blocking(move || cgroup.kill_all()).await;
                }
            }
            exited.await;
        };
        let kept = async {
            match self.config.jobs.on_core_shutdown {
                OnCoreShutdown::Keep => self.shutdown.cancelled().await,
                OnCoreShutdown::Stop => std::future::pending().await,
            }
        };
        tokio::select! {
            () = ended => {}
            // The job runs on under its supervisor; the next start re-attaches it.
            () = kept => {
                sampler.abort();
                return;
            }
        }
        sampler.abort();
        let exit_path = exit_file(&self.spool_dir, &job.id);
        let exit = {
            let exit_path = exit_path.clone();
            let output = job.output.clone();
            tokio::task::spawn_blocking(move || {
                // All of the output, before the end is recorded with what the spool holds.
                if let Err(error) = output.read_to_end() {
                    tracing::error!(job_id = %output.job_id(), %error, "cannot read the end of the job's spool");
                }
                supervisor::read_exit(&exit_path)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        // Taken out of the job: a finished job keeps no cgroup handle.
        let cgroup = joblet_daemon::lock(&job.cgroup).take();
        let usage = match cgroup {
            Some(cgroup) => tokio::task::spawn_blocking(move || {
                let usage = cgroup.usage();
                cgroup.kill_all();
                cgroup.delete();
                usage
            })
            .await
            .unwrap_or_default(),
            None => Default::default(),
        };
        let (status, exit_code, reason) = match exit {
            Ok(Some(exit)) => {
                let (status, reason) = end_of(&job, exit.exit_code, usage.oom_kills);
                (status, exit.exit_code, reason)
            }
            Ok(None) => (Status::Failed, -1, lost_reason(&job, attached)),
            Err(error) => (
                Status::Failed,
                -1,
                format!(
                    "lost: the job's exit status cannot be read ({error}); its output up to then is kept"
                ),
            ),
        };
        if status == Status::Failed {
            metrics::counter!(m::JOB_FAILURES).increment(1);
        }
        // Ended first, then the streams: a client whose log stream ends sees the job ended.
        let _ = job
            .transition(Transition::Ended {
                status,
                exit_code,
                reason,
            })
            .await;
        job.metrics.finish();
        job.output.finish();
        self.publish_job_gauges();
        // The journal holds the end and what the spool holds now.
        let progress = crate::output::progress_path(job.output.path());
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(exit_path);
            let _ = std::fs::remove_file(progress);
        })
        .await;
        tracing::info!(job_id = %job.id, status = status.as_str(), exit_code, "job ended");
    }

    async fn finish_unstarted(&self, job: &Job, status: Status, reason: &str) {
        let _ = job
            .transition(Transition::Ended {
                status,
                exit_code: if status == Status::Failed { -1 } else { 0 },
                reason: reason.to_owned(),
            })
            .await;
        job.output.finish();
        job.metrics.finish();
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

    /// Removes an ended job: its record, its spools, the work dir joblet made for it, and (best
    /// effort) its history in joblet-persist.
    pub async fn delete(&self, job: &Arc<Job>) -> Result<(), CoreError> {
        let status = job.status();
        if !status.is_terminal() {
            return Err(CoreError::FailedPrecondition(format!(
                "job {} is {}; stop or cancel it first",
                job.id,
                status.as_str()
            )));
        }
        self.drop_job(job).await;
        if let Some(target) = self.config.persist.query_target()
            && let Err(error) = crate::history::delete(&target, &job.id).await
        {
            tracing::warn!(job_id = %job.id, %error, "could not delete the job's history in joblet-persist");
        }
        Ok(())
    }

    /// Forgets a finished job in core: its record, spools and the work dir joblet made.
    async fn drop_job(&self, job: &Arc<Job>) {
        joblet_daemon::write(&self.jobs).remove(&job.id);
        job.deleted.store(true, Ordering::Relaxed);
        let journal = self.journal.clone();
        let id = job.id.clone();
        if let Err(error) = blocking(move || {
            journal
                .forget(&id)
                .map_err(|e| CoreError::Internal(e.to_string()))
        })
        .await
        {
            tracing::warn!(job_id = %job.id, %error, "cannot remove the job from the state journal; it is listed again after a restart");
        }
        self.remove_spools(job).await;
        if job.spec.work_dir.is_none() {
            let dir = job.work_dir.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        if let Some(sender) = self.replication() {
            sender.forget_job(&job.id);
        }
        self.publish_job_gauges();
    }

    async fn remove_spools(&self, job: &Job) {
        let files = [
            job.output.path().to_owned(),
            crate::output::progress_path(job.output.path()),
            job.metrics.path().to_owned(),
            exit_file(&self.spool_dir, &job.id),
        ];
        let _ = tokio::task::spawn_blocking(move || {
            for file in files {
                let _ = std::fs::remove_file(file);
            }
        })
        .await;
    }

    /// Drops finished jobs whose spools are no longer needed (see the module docs), every
    /// half `keep_finished` (at most [`EVICTION_INTERVAL`]), until shutdown.
    async fn evict_finished(self: Arc<Self>) {
        let interval = (self.config.jobs.keep_finished / 2)
            .clamp(Duration::from_millis(100), EVICTION_INTERVAL);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            self.evict_pass().await;
        }
    }

    async fn evict_pass(&self) {
        let now = Utc::now();
        let keep = chrono::Duration::from_std(self.config.jobs.keep_finished)
            .unwrap_or(chrono::Duration::MAX);
        let mut spooled_bytes = 0u64;
        let mut finished: Vec<(chrono::DateTime<Utc>, u64, Arc<Job>)> = Vec::new();
        for job in self.jobs() {
            let bytes = job.output.progress().end_offset + job.metrics.progress().end_offset;
            spooled_bytes += bytes;
            let state = job.state();
            if !state.status.is_terminal() {
                continue;
            }
            let ended = state.end_time.unwrap_or(job.created);
            match &self.replication {
                Some(replication) if replication.is_complete(&job) => {
                    if ended + keep <= now {
                        self.evict(&job, "replicated", bytes).await;
                        spooled_bytes -= bytes;
                    } else {
                        // A restart before the eviction then need not send it again.
                        replication.checkpoint(&job).await;
                    }
                }
                Some(_) => {}
                None => finished.push((ended, bytes, job)),
            }
        }
        let cap = self.config.jobs.spool_max_bytes.as_u64();
        if spooled_bytes > cap {
            finished.sort_by_key(|(ended, _, _)| *ended);
            for (_, bytes, job) in finished {
                if spooled_bytes <= cap {
                    break;
                }
                self.evict(&job, "spool_max_bytes", bytes).await;
                spooled_bytes -= bytes;
            }
        }
        metrics::gauge!(m::SPOOL_BYTES).set(spooled_bytes as f64);
    }

    async fn evict(&self, job: &Arc<Job>, reason: &'static str, bytes: u64) {
        tracing::info!(job_id = %job.id, reason, spool_bytes = bytes, "finished job dropped from joblet-core with its spool");
        metrics::counter!(m::JOBS_EVICTED, "reason" => reason).increment(1);
        self.drop_job(job).await;
    }

    /// Ends core's part at shutdown. Running jobs are left to their supervisors
    /// (`on_core_shutdown: keep`) or stopped and waited for (`stop`); scheduled jobs stay
    /// scheduled for the next start. Then waits a while for persist to acknowledge what ended
    /// jobs wrote, records how far replication got, and says what is still unreplicated.
    pub async fn shutdown(&self) {
        let jobs = self.jobs();
        let running: Vec<_> = jobs
            .iter()
            .filter(|job| matches!(job.status(), Status::Initializing | Status::Running))
            .collect();
        match self.config.jobs.on_core_shutdown {
            OnCoreShutdown::Stop => {
                for job in &running {
                    job.request_end(EndRequest::Shutdown);
                    if let Some(cgroup) = job.cgroup() {
                        let _ = tokio::task::spawn_blocking(move || cgroup.kill_all()).await;
                    }
                }
            }
            OnCoreShutdown::Keep if !running.is_empty() => {
                tracing::info!(
                    jobs = running.len(),
                    "running jobs keep running under their supervisors; the next start of joblet-core re-attaches them"
                );
            }
            OnCoreShutdown::Keep => {}
        }
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some jobs did not finish within the shutdown wait");
        }
        if let Some(replication) = &self.replication {
            // Jobs that run on are replicated after the next start, from their checkpoint.
            let deadline = Instant::now() + REPLICATION_DRAIN_WAIT;
            while replication.sender().is_connected()
                && Instant::now() < deadline
                && self
                    .jobs()
                    .iter()
                    .any(|job| job.status().is_terminal() && !replication.is_complete(job))
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            replication.drain(Duration::ZERO).await;
            let (mut waiting_jobs, mut waiting_lines) = (0u64, 0u64);
            for job in self.jobs() {
                replication.checkpoint(&job).await;
                let behind = replication.lines_behind(&job);
                if job.status().is_terminal() && (behind > 0 || !replication.is_complete(&job)) {
                    tracing::warn!(job_id = %job.id, lines = behind, "job output waits in its spool for joblet-persist; it is sent after the next start");
                    waiting_jobs += 1;
                    waiting_lines += behind;
                }
            }
            if waiting_jobs > 0 {
                tracing::warn!(
                    jobs = waiting_jobs,
                    lines = waiting_lines,
                    "joblet-persist has not acknowledged everything; the rest stays in the spools under {} and is sent after the next start",
                    self.spool_dir.display()
                );
            }
        }
        self.cgroups.remove_parent();
    }

    fn publish_job_gauges(&self) {
        let mut counts: HashMap<Status, usize> = HashMap::new();
        for job in joblet_daemon::read(&self.jobs).values() {
            *counts.entry(job.status()).or_default() += 1;
        }
        for status in Status::ALL {
            metrics::gauge!(m::JOBS, "state" => status.as_str())
                .set(counts.get(&status).copied().unwrap_or(0) as f64);
        }
    }
}

/// The status and reason of a job that exited with `exit_code` (128+N: killed by signal N),
/// `oom_kills` of its processes killed for lack of memory.
fn end_of(job: &Job, exit_code: i32, oom_kills: u64) -> (Status, String) {
    match job.end_request() {
        Some(EndRequest::Stop) => (Status::Stopped, "stopped by request".to_owned()),
        Some(EndRequest::Shutdown) => (Status::Stopped, "joblet-core shut down".to_owned()),
        Some(EndRequest::Timeout) => (
            Status::Failed,
            format!("timed out after {}", job.spec.timeout_text),
        ),
        // A process of the job was OOM-killed but the job went on and succeeded.
        None if oom_kills > 0 && exit_code == 0 => (
            Status::Completed,
            format!(
                "completed; {} killed for exceeding max_memory {} MiB",
                processes(oom_kills),
                job.spec.max_memory_mb
            ),
        ),
        None if oom_kills > 0 => (
            Status::Failed,
            format!(
                "out of memory: {} killed for exceeding max_memory {} MiB",
                processes(oom_kills),
                job.spec.max_memory_mb
            ),
        ),
        None if exit_code == 0 => (Status::Completed, String::new()),
        None if exit_code > 128 => (
            Status::Failed,
            format!("killed by signal {}", exit_code - 128),
        ),
        None => (Status::Failed, format!("exited with code {exit_code}")),
    }
}

/// Why a job ended without an exit status: its supervisor is gone (`attached`: it exited
/// without recording one, else it was not found when core started).
fn lost_reason(job: &Job, attached: bool) -> String {
    let rebooted = job
        .state()
        .supervisor
        .is_some_and(|id| supervisor::boot_id().is_ok_and(|boot| boot != id.boot_id));
    let what = if rebooted {
        "the host restarted while the job ran"
    } else if attached {
        "the job's supervisor was killed"
    } else {
        "the job's supervisor ended while joblet-core was down, without recording how the job ended"
    };
    format!("lost: {what}; its output up to then is kept")
}

fn processes(count: u64) -> String {
    if count == 1 {
        "1 process".to_owned()
    } else {
        format!("{count} processes")
    }
}

/// Runs blocking `work` on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, CoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CoreError::Internal(format!("blocking task failed: {e}")))?
}

/// A job id or a prefix of one: hex digits and dashes, at most a UUID's length.
fn check_id(id_or_prefix: &str) -> Result<(), CoreError> {
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
    Ok(())
}

/// Whether a scheduled job can be started by a later run of core: the journal keeps neither
/// upload contents nor secret values.
fn resumable(spec: &JobSpec) -> bool {
    spec.secret_environment.is_empty() && spec.uploads.iter().all(|u| u.is_directory)
}

/// Reads the journal and the spool directory back (blocking). Nothing is deleted: a spool
/// without a record becomes a FAILED job of unknown command, so its output still reaches
/// persist and stays readable.
fn restore(state_dir: &Path, spool_dir: &Path) -> anyhow::Result<Restored> {
    use anyhow::Context;
    let path = state_dir.join("jobs.journal");
    let (journal, loaded) =
        Journal::open(&path).with_context(|| format!("state journal {}", path.display()))?;
    if loaded.skipped_bytes > 0 {
        tracing::warn!(
            journal = %path.display(),
            bytes = loaded.skipped_bytes,
            places = loaded.skipped_regions,
            "core's state journal had unreadable bytes; they were skipped and every readable record kept"
        );
        metrics::counter!(m::STATE_SKIPPED_BYTES).increment(loaded.skipped_bytes);
    }
    let journal = Arc::new(journal);
    let mut jobs = Vec::with_capacity(loaded.jobs.len());
    let mut known = HashSet::with_capacity(loaded.jobs.len());
    for stored in loaded.jobs {
        known.insert(stored.id.clone());
        match restore_job(stored, spool_dir, &journal) {
            Ok(job) => jobs.push(Arc::new(job)),
            Err((id, error)) => {
                tracing::error!(job_id = %id, %error, "cannot read the job's spools; it is not restored")
            }
        }
    }
    let orphans = std::fs::read_dir(spool_dir)
        .with_context(|| format!("read {}", spool_dir.display()))?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let id = name.strip_suffix(".log")?;
            (check_id(id).is_ok() && id.len() == 36 && !known.contains(id)).then(|| id.to_owned())
        })
        .collect::<Vec<_>>();
    for id in orphans {
        let stored = StoredJob {
            id: id.clone(),
            version: 1,
            created: std::fs::metadata(log_spool(spool_dir, &id))
                .and_then(|m| m.modified())
                .map(chrono::DateTime::<Utc>::from)
                .unwrap_or_else(|_| Utc::now()),
            spec: JobSpec::unknown(),
            work_dir: PathBuf::new(),
            status: Status::Failed,
            exit_code: -1,
            start_time: None,
            end_time: Some(Utc::now()),
            reason: "lost: joblet-core kept no record of this job (its state journal was damaged); its output is kept".into(),
            spooled: None,
            replicated: Default::default(),
            supervisor: None,
        };
        match restore_job(stored, spool_dir, &journal) {
            Ok(job) => {
                tracing::warn!(job_id = %id, "a spool without a record in the state journal is kept as a FAILED job");
                if let Err(error) = journal.record(&job.stored()) {
                    tracing::warn!(job_id = %id, %error, "cannot record the job");
                }
                jobs.push(Arc::new(job));
            }
            Err((id, error)) => {
                tracing::error!(job_id = %id, %error, "cannot read the spool of an unrecorded job")
            }
        }
    }
    jobs.sort_by_key(|job| job.created);
    metrics::counter!(m::JOBS_RESTORED).increment(jobs.len() as u64);
    if !jobs.is_empty() {
        tracing::info!(jobs = jobs.len(), "jobs restored from the state journal");
    }
    Ok(Restored { journal, jobs })
}

fn restore_job(
    stored: StoredJob,
    spool_dir: &Path,
    journal: &Arc<Journal>,
) -> Result<Job, (String, std::io::Error)> {
    let id = stored.id.clone();
    let spooled = stored.spooled;
    if stored.status == Status::Scheduled {
        // Not started yet, so nothing is spooled: new spools to write to once it starts.
        let (logs, samples) = (log_spool(spool_dir, &id), metrics_spool(spool_dir, &id));
        let _ = std::fs::remove_file(&logs);
        let _ = std::fs::remove_file(&samples);
        let output = Output::create(&id, &logs).map_err(|e| (id.clone(), e))?;
        let metrics = MetricsLog::create(&samples).map_err(|e| (id.clone(), e))?;
        let parts = JobParts {
            output,
            metrics,
            journal: journal.clone(),
        };
        return Ok(Job::restore(stored, parts));
    }
    let (logs, samples) = (log_spool(spool_dir, &id), metrics_spool(spool_dir, &id));
    let (output, metrics) = if stored.status.is_terminal() {
        (
            Output::restore(&id, &logs, spooled.map(|s| (s.log_lines, s.log_bytes))),
            MetricsLog::restore(&samples, spooled.map(|s| (s.samples, s.sample_bytes))),
        )
    } else {
        // Its supervisor may still be writing: followed until it is known to have ended.
        (Output::follow(&id, &logs), MetricsLog::reopen(&samples))
    };
    let output = output.map_err(|e| (id.clone(), e))?;
    let metrics = metrics.map_err(|e| (id.clone(), e))?;
    Ok(Job::restore(
        stored,
        JobParts {
            output,
            metrics,
            journal: journal.clone(),
        },
    ))
}
