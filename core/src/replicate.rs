//! Replay: what the replication queue refused (queue full, persist down) or what persist had
//! not acknowledged when a connection broke is sent again from the spool, so a persist restart
//! mid-job loses nothing; persist stores idempotently, so nothing is stored twice.
//!
//! Triggers: every reconnect (replay each job from its highest acknowledged sequence + 1) and a
//! periodic check for jobs whose live sends were refused. Replays wait for queue room instead
//! of dropping.

use std::sync::Arc;
use std::time::Duration;

use joblet_ipc::{IpcSender, MessageType};
use tokio_util::sync::CancellationToken;

use crate::job::Job;
use crate::manager::JobManager;

const CHECK_INTERVAL: Duration = Duration::from_millis(500);

pub async fn run(manager: Arc<JobManager>, sender: IpcSender, shutdown: CancellationToken) {
    let mut connections = sender.connections();
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    loop {
        let reconnected = tokio::select! {
            () = shutdown.cancelled() => return,
            changed = connections.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
            _ = ticker.tick() => false,
        };
        if !sender.is_connected() {
            continue;
        }
        for job in manager.jobs() {
            if shutdown.is_cancelled() {
                return;
            }
            replay_job(&sender, &job, reconnected).await;
        }
    }
}

async fn replay_job(sender: &IpcSender, job: &Arc<Job>, reconnected: bool) {
    let unacked = |kind, last: u64| {
        let acked = sender.acknowledged(&job.id, kind);
        (reconnected && last > acked).then_some(acked + 1)
    };
    let logs_from = lowest(
        unacked(MessageType::Log, job.output.progress().last_sequence),
        job.output.take_replay_from(),
    );
    if let Some(from) = logs_from
        && let Err(from) = replay_logs(sender, job, from).await
    {
        job.output.mark_replay_from(from);
    }
    let metrics_from = lowest(
        unacked(MessageType::Metric, job.metrics.last_sequence()),
        job.metrics.take_replay_from(),
    );
    if let Some(from) = metrics_from {
        for sample in job.metrics.after(from - 1) {
            let message = joblet_ipc::metric_message(
                &job.id,
                sample.sequence,
                sample.timestamp,
                &sample.data,
            );
            if sender.send(message).await.is_err() {
                job.metrics.mark_replay_from(sample.sequence);
                break;
            }
        }
    }
}

fn lowest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sends the job's lines from `from` to the current end of its spool; on failure returns the
/// first sequence not sent.
async fn replay_logs(sender: &IpcSender, job: &Arc<Job>, from: u64) -> Result<(), u64> {
    tracing::debug!(job_id = %job.id, from, "replaying log lines to joblet-persist");
    let Ok(mut reader) = job.output.reader(from.saturating_sub(1)) else {
        return Err(from);
    };
    loop {
        match reader.next_batch(false).await {
            Ok(Some(records)) => {
                for record in records {
                    let stream = match record.stream() {
                        joblet_proto::joblet::LogStream::Stderr => joblet_ipc::Stream::Stderr,
                        _ => joblet_ipc::Stream::Stdout,
                    };
                    let message = joblet_ipc::log_message(
                        &job.id,
                        record.sequence,
                        record.timestamp,
                        stream,
                        record.content,
                    );
                    if sender.send(message).await.is_err() {
                        return Err(record.sequence);
                    }
                }
            }
            Ok(None) => return Ok(()),
            Err(_) => return Err(from),
        }
    }
}
