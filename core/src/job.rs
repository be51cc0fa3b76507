//! A job: its validated spec, its state machine, its output and its samples.
//!
//! States: SCHEDULED → INITIALIZING → RUNNING → COMPLETED | FAILED | STOPPED, and CANCELED for
//! a job cancelled before it started. [`Job::transition`] is the one place that decides which
//! changes are legal ([`JobState::after`]), records each in core's journal ([`crate::state`])
//! and then publishes it on a watch channel, so that waiters (StopJob, log streams ending with
//! the job, replication of the job's record) need no polling, and nothing a client saw is lost
//! in a restart.

use joblet_daemon::lock;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cgroup::JobCgroup;
use crate::error::CoreError;
use crate::metrics_log::MetricsLog;
use crate::output::Output;
use crate::spec::JobSpec;
use crate::state::{Acked, Journal, Spooled, StoredJob};
use crate::supervisor::SupervisorId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Scheduled,
    Initializing,
    Running,
    Completed,
    Failed,
    Stopped,
    Canceled,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Scheduled,
        Status::Initializing,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Stopped,
        Status::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "SCHEDULED",
            Status::Initializing => "INITIALIZING",
            Status::Running => "RUNNING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
            Status::Stopped => "STOPPED",
            Status::Canceled => "CANCELED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Stopped | Status::Canceled
        )
    }
}

/// A change of a job's state.
#[derive(Debug, Clone)]
pub enum Transition {
    /// A scheduled job's time came.
    Initializing,
    /// Its process started, under this supervisor.
    Running { supervisor: SupervisorId },
    /// It ended (or never started); its output is complete.
    Ended {
        status: Status,
        exit_code: i32,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct JobState {
    pub status: Status,
    pub exit_code: i32,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// Why the job failed, stopped or was canceled; empty otherwise.
    pub reason: String,
    /// Grows with every transition (the version of the record replicated to persist).
    pub version: u64,
    /// The supervisor of the running job.
    pub supervisor: Option<SupervisorId>,
}

impl JobState {
    /// A job's first state, before any transition.
    pub fn initial(status: Status) -> JobState {
        JobState {
            status,
            exit_code: 0,
            start_time: None,
            end_time: None,
            reason: String::new(),
            version: 1,
            supervisor: None,
        }
    }

    /// The state `transition` leads to, or why it is not allowed from this one.
    pub fn after(&self, transition: Transition) -> Result<JobState, String> {
        let mut next = self.clone();
        next.version += 1;
        match (self.status, transition) {
            (Status::Scheduled, Transition::Initializing) => {
                next.status = Status::Initializing;
            }
            (Status::Initializing, Transition::Running { supervisor }) => {
                next.status = Status::Running;
                next.start_time = Some(Utc::now());
                next.supervisor = Some(supervisor);
            }
            (
                from,
                Transition::Ended {
                    status,
                    exit_code,
                    reason,
                },
            ) if !from.is_terminal()
                && status.is_terminal()
                && (status != Status::Completed || from == Status::Running)
                && (status != Status::Canceled || from != Status::Running) =>
            {
                next.status = status;
                next.exit_code = exit_code;
                next.reason = reason;
                next.end_time = Some(Utc::now());
                next.supervisor = None;
            }
            (from, transition) => {
                return Err(format!("{} cannot go {transition:?}", from.as_str()));
            }
        }
        Ok(next)
    }
}

/// Why a running job is being ended by joblet rather than by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndRequest {
    Stop,
    Timeout,
    Shutdown,
}

pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub created: DateTime<Utc>,
    pub work_dir: PathBuf,
    pub output: Arc<Output>,
    pub metrics: Arc<MetricsLog>,
    state: Mutex<JobState>,
    changes: watch::Sender<Status>,
    /// Serialises transitions, so that they are journaled and published in one order.
    transitions: tokio::sync::Mutex<()>,
    journal: Arc<Journal>,
    /// What persist had acknowledged at the last checkpoint in the journal.
    replicated: Mutex<Acked>,
    /// Cancels a scheduled start.
    pub cancel: CancellationToken,
    end_request: Mutex<Option<EndRequest>>,
    pub cgroup: Mutex<Option<Arc<JobCgroup>>>,
    pub deleted: AtomicBool,
}

/// A time as the API gives it: RFC 3339 in UTC, to the millisecond ("" when not set).
pub fn rfc3339(time: Option<DateTime<Utc>>) -> String {
    time.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The parts of a job that live outside its record.
pub struct JobParts {
    pub output: Arc<Output>,
    pub metrics: Arc<MetricsLog>,
    pub journal: Arc<Journal>,
}

impl Job {
    /// A new job, not yet recorded: [`Job::record_new`] makes it durable.
    pub fn new(id: String, spec: JobSpec, work_dir: PathBuf, parts: JobParts) -> Job {
        let status = if spec.schedule.is_some() {
            Status::Scheduled
        } else {
            Status::Initializing
        };
        let state = JobState::initial(status);
        Job::assemble(
            id,
            spec,
            Utc::now(),
            work_dir,
            state,
            Acked::default(),
            parts,
        )
    }

    /// A job read back from the journal.
    pub fn restore(stored: StoredJob, parts: JobParts) -> Job {
        let state = JobState {
            status: stored.status,
            exit_code: stored.exit_code,
            start_time: stored.start_time,
            end_time: stored.end_time,
            reason: stored.reason,
            version: stored.version,
            supervisor: stored.supervisor,
        };
        Job::assemble(
            stored.id,
            stored.spec,
            stored.created,
            stored.work_dir,
            state,
            stored.replicated,
            parts,
        )
    }

    fn assemble(
        id: String,
        spec: JobSpec,
        created: DateTime<Utc>,
        work_dir: PathBuf,
        state: JobState,
        replicated: Acked,
        parts: JobParts,
    ) -> Job {
        Job {
            id,
            spec,
            created,
            work_dir,
            output: parts.output,
            metrics: parts.metrics,
            changes: watch::Sender::new(state.status),
            state: Mutex::new(state),
            transitions: tokio::sync::Mutex::new(()),
            journal: parts.journal,
            replicated: Mutex::new(replicated),
            cancel: CancellationToken::new(),
            end_request: Mutex::new(None),
            cgroup: Mutex::new(None),
            deleted: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> JobState {
        lock(&self.state).clone()
    }

    pub fn status(&self) -> Status {
        *self.changes.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.changes.subscribe()
    }

    /// The job's record as the journal keeps it.
    pub fn stored(&self) -> StoredJob {
        self.stored_with(&self.state(), *lock(&self.replicated))
    }

    fn stored_with(&self, state: &JobState, replicated: Acked) -> StoredJob {
        let spooled = state.status.is_terminal().then(|| {
            let logs = self.output.progress();
            let samples = self.metrics.progress();
            Spooled {
                log_lines: logs.last_sequence,
                log_bytes: logs.end_offset,
                samples: samples.last_sequence,
                sample_bytes: samples.end_offset,
            }
        });
        StoredJob {
            id: self.id.clone(),
            version: state.version,
            created: self.created,
            spec: self.spec.clone(),
            work_dir: self.work_dir.clone(),
            status: state.status,
            exit_code: state.exit_code,
            start_time: state.start_time,
            end_time: state.end_time,
            reason: state.reason.clone(),
            spooled,
            replicated,
            supervisor: state.supervisor.clone(),
        }
    }

    /// Records a new job durably (before `RunJob` answers).
    pub async fn record_new(&self) -> Result<(), CoreError> {
        let _serial = self.transitions.lock().await;
        self.write(self.stored()).await.map_err(|error| {
            CoreError::Internal(format!(
                "cannot record the job in the state journal: {error}"
            ))
        })
    }

    /// Applies `transition` if it is legal: records the new state in the journal, then
    /// publishes it. A journal that cannot be written is logged and counted; the job's state
    /// still changes (what happened to the process cannot be undone).
    pub async fn transition(&self, transition: Transition) -> Result<JobState, CoreError> {
        let _serial = self.transitions.lock().await;
        let next = self
            .state()
            .after(transition)
            .map_err(|e| CoreError::FailedPrecondition(format!("job {}: {e}", self.id)))?;
        let record = self.stored_with(&next, *lock(&self.replicated));
        if let Err(error) = self.write(record).await {
            tracing::error!(job_id = %self.id, %error, status = next.status.as_str(), "cannot record the job's new state in the state journal; it is lost if joblet-core restarts");
            metrics::counter!(crate::metrics::STATE_WRITE_ERRORS).increment(1);
        }
        *lock(&self.state) = next.clone();
        self.changes.send_replace(next.status);
        Ok(next)
    }

    /// Records what persist acknowledged, so that a restart resumes replication from there.
    /// Only written when it changed.
    pub async fn checkpoint_replication(&self, acked: Acked) {
        let _serial = self.transitions.lock().await;
        if *lock(&self.replicated) == acked {
            return;
        }
        let record = self.stored_with(&self.state(), acked);
        match self.write(record).await {
            Ok(()) => *lock(&self.replicated) = acked,
            Err(error) => {
                tracing::warn!(job_id = %self.id, %error, "cannot record replication progress; it is resent after a restart");
                metrics::counter!(crate::metrics::STATE_WRITE_ERRORS).increment(1);
            }
        }
    }

    /// What persist had acknowledged at the last checkpoint.
    pub fn replicated(&self) -> Acked {
        *lock(&self.replicated)
    }

    async fn write(&self, record: StoredJob) -> std::io::Result<()> {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || journal.record(&record))
            .await
            .map_err(std::io::Error::other)?
    }

    pub fn request_end(&self, request: EndRequest) {
        lock(&self.end_request).get_or_insert(request);
    }

    pub fn end_request(&self) -> Option<EndRequest> {
        *lock(&self.end_request)
    }

    pub fn cgroup(&self) -> Option<Arc<JobCgroup>> {
        lock(&self.cgroup).clone()
    }

    /// Waits until the job reaches a terminal state.
    pub async fn wait_terminal(&self) -> Status {
        let mut changes = self.subscribe();
        match changes.wait_for(|s| s.is_terminal()).await {
            Ok(status) => *status,
            Err(_) => self.status(),
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: Status) -> JobState {
        JobState::initial(status)
    }

    fn running() -> Transition {
        Transition::Running {
            supervisor: SupervisorId {
                pid: 7,
                started: 1,
                boot_id: "boot".into(),
            },
        }
    }

    fn ended(status: Status) -> Transition {
        Transition::Ended {
            status,
            exit_code: 0,
            reason: String::new(),
        }
    }

    #[test]
    fn only_legal_transitions_are_taken_and_each_bumps_the_version() {
        use Status::*;
        let legal = [
            (Scheduled, Transition::Initializing, Initializing),
            (Initializing, running(), Running),
            (Running, ended(Completed), Completed),
            (Running, ended(Failed), Failed),
            (Running, ended(Stopped), Stopped),
            (Scheduled, ended(Canceled), Canceled),
            (Initializing, ended(Failed), Failed),
        ];
        for (from, transition, to) in legal {
            let next = state(from).after(transition).unwrap();
            assert_eq!(next.status, to);
            assert_eq!(next.version, 2);
        }
        let illegal = [
            (Running, Transition::Initializing),
            (Scheduled, running()),
            (Scheduled, ended(Completed)),
            (Running, ended(Canceled)),
            (Running, ended(Running)),
            (Completed, ended(Failed)),
            (Canceled, Transition::Initializing),
        ];
        for (from, transition) in illegal {
            let described = format!("{from:?} {transition:?}");
            assert!(state(from).after(transition).is_err(), "{described}");
        }
        let running = state(Initializing).after(running()).unwrap();
        assert!(running.start_time.is_some() && running.supervisor.is_some());
        let done = running.after(ended(Completed)).unwrap();
        assert!(done.end_time.is_some() && done.version == 3);
        assert!(
            done.supervisor.is_none(),
            "an ended job has no supervisor to re-attach"
        );
    }
}
