//! Feeds the IPC receiver's batches into the store on the blocking pool. A batch is
//! acknowledged by the receiver only after `ingest` returned, i.e. once it is durable by the
//! configured policy.

use std::sync::Arc;

use joblet_ipc::{IpcMessage, MessageSink};

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
    async fn store(&self, mut batch: Vec<IpcMessage>) -> Result<Vec<IpcMessage>, String> {
        let store = self.store.clone();
        let (outcome, batch) = tokio::task::spawn_blocking(move || {
            let outcome = store.ingest(&batch);
            // Dropped here, off the IPC workers; the emptied vector goes back for reuse.
            batch.clear();
            (outcome, batch)
        })
        .await
        .map_err(|e| format!("ingest task failed: {e}"))?;
        let outcome = outcome.map_err(|e| e.to_string())?;
        if outcome.invalid > 0 {
            tracing::warn!(
                count = outcome.invalid,
                "skipped replicated records with invalid payloads"
            );
        }
        Ok(batch)
    }
}
