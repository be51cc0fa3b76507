//! A job's resource samples: kept in memory (bounded), streamed live and replicated (by
//! [`crate::replicate`], which reads them like any other subscriber).

use std::collections::VecDeque;
use std::sync::Mutex;

use joblet_ipc::MetricData;
use tokio::sync::watch;

/// Samples kept per job; older ones are only in joblet-persist. One per second is a day.
const MAX_SAMPLES: usize = 86_400;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub sequence: u64,
    pub timestamp: i64,
    pub data: MetricData,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SampleProgress {
    pub last_sequence: u64,
    pub finished: bool,
}

pub struct MetricsLog {
    samples: Mutex<State>,
    progress: watch::Sender<SampleProgress>,
}

struct State {
    samples: VecDeque<Sample>,
    next_sequence: u64,
}

impl Default for MetricsLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsLog {
    pub fn new() -> Self {
        MetricsLog {
            samples: Mutex::new(State {
                samples: VecDeque::new(),
                next_sequence: 1,
            }),
            progress: watch::Sender::new(SampleProgress::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, timestamp: i64, data: MetricData) {
        let mut state = self.lock();
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        if state.samples.len() == MAX_SAMPLES {
            state.samples.pop_front();
        }
        state.samples.push_back(Sample {
            sequence,
            timestamp,
            data,
        });
        drop(state);
        self.progress.send_modify(|p| p.last_sequence = sequence);
    }

    pub fn finish(&self) {
        self.progress.send_modify(|p| p.finished = true);
    }

    /// Samples after `after_sequence`, oldest first.
    pub fn after(&self, after_sequence: u64) -> Vec<Sample> {
        let state = self.lock();
        let start = state
            .samples
            .partition_point(|s| s.sequence <= after_sequence);
        state.samples.range(start..).cloned().collect()
    }

    pub fn last_sequence(&self) -> u64 {
        self.progress.borrow().last_sequence
    }

    pub fn subscribe(&self) -> watch::Receiver<SampleProgress> {
        self.progress.subscribe()
    }
}
