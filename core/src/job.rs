//! A job: its validated spec, its state machine, its output and its samples.
//!
//! States: SCHEDULED → INITIALIZING → RUNNING → COMPLETED | FAILED | STOPPED, and CANCELED for
//! a scheduled job cancelled before it started. Every change is published on a watch channel
//! so that waiters (StopJob, log streams ending with the job) need no polling.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cgroup::JobCgroup;
use crate::metrics_log::MetricsLog;
use crate::output::Output;
use crate::spec::JobSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

#[derive(Debug, Clone)]
pub struct JobState {
    pub status: Status,
    pub exit_code: i32,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// Why the job failed, stopped or was canceled; empty otherwise.
    pub reason: String,
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
    /// Cancels a scheduled start.
    pub cancel: CancellationToken,
    end_request: Mutex<Option<EndRequest>>,
    pub cgroup: Mutex<Option<Arc<JobCgroup>>>,
    /// The output threads; joined before the job is marked ended.
    pub pumps: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    pub deleted: AtomicBool,
}

pub fn rfc3339(time: Option<DateTime<Utc>>) -> String {
    time.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

impl Job {
    pub fn new(
        id: String,
        spec: JobSpec,
        work_dir: PathBuf,
        output: Arc<Output>,
        metrics: Arc<MetricsLog>,
    ) -> Job {
        let status = if spec.schedule.is_some() {
            Status::Scheduled
        } else {
            Status::Initializing
        };
        Job {
            id,
            spec,
            created: Utc::now(),
            work_dir,
            output,
            metrics,
            state: Mutex::new(JobState {
                status,
                exit_code: 0,
                start_time: None,
                end_time: None,
                reason: String::new(),
            }),
            changes: watch::Sender::new(status),
            cancel: CancellationToken::new(),
            end_request: Mutex::new(None),
            cgroup: Mutex::new(None),
            pumps: Arc::new(Mutex::new(Vec::new())),
            deleted: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> JobState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn status(&self) -> Status {
        *self.changes.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.changes.subscribe()
    }

    /// Applies `change` to the state and publishes the new status.
    pub fn update(&self, change: impl FnOnce(&mut JobState)) {
        let status = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            change(&mut state);
            state.status
        };
        self.changes.send_replace(status);
    }

    pub fn request_end(&self, request: EndRequest) {
        let mut current = self.end_request.lock().unwrap_or_else(|e| e.into_inner());
        current.get_or_insert(request);
    }

    pub fn end_request(&self) -> Option<EndRequest> {
        *self.end_request.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cgroup(&self) -> Option<Arc<JobCgroup>> {
        self.cgroup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
