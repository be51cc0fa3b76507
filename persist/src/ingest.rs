//! Feeds the IPC receiver's batches into the store on the blocking pool. A batch is
//! acknowledged by the receiver only once it is durable by the configured policy: after
//! `ingest` returned, and with durability `flushed` after the next flush.

use std::sync::Arc;

use joblet_ipc::{Batch, MessageSink, Refusal};

use crate::store::Store;

pub struct StoreSink {
    store: Arc<Store>,
}

impl StoreSink {
    pub fn new(store: Arc<Store>) -> Self {
        StoreSink { store }
    }
}

impl MessageSink for StoreSink {
    async fn store(&self, batch: Batch) -> Result<Vec<Refusal>, String> {
        let store = self.store.clone();
        // The batch is dropped with the task, off the IPC workers.
        let outcome = tokio::task::spawn_blocking(move || store.ingest(&batch))
            .await
            .map_err(|e| format!("ingest task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        // A sender writing bad payloads must not flood the log: once a minute, with a count.
        static REFUSED_LOG: joblet_daemon::LogLimiter =
            joblet_daemon::LogLimiter::new(std::time::Duration::from_secs(60));
        if let Some(first) = outcome.refused.first()
            && let Some(batches) = REFUSED_LOG.hit()
        {
            tracing::warn!(
                count = outcome.refused.len(),
                job_id = first.job_id,
                sequence = first.sequence,
                why = first.detail,
                batches_since_last_report = batches,
                "replicated records that cannot be read: refused (log lines are kept as gap markers)"
            );
        }
        Ok(outcome.refused)
    }

    async fn durable(&self) -> Result<(), String> {
        let (Some(target), Some(mut flushed)) = (self.store.durable_after(), self.store.flushed())
        else {
            return Ok(());
        };
        let settled = flushed
            .wait_for(|done| done.settles(target).is_some())
            .await
            .map_err(|_| "the store closed before flushing".to_owned())?
            .settles(target);
        match settled {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(format!("flushing to disk failed: {why}")),
            None => Err("flushing to disk failed".to_owned()),
        }
    }
}
