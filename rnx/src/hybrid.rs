//! What `job log` and `job metrics` share: both daemons' clients, the job's full id, the plan
//! of which records come from persist's history and which from core ([`Sources::plan`], from
//! persist's summary of the job), and what is said when one of them is missing.

use joblet_proto::joblet::GetJobStatusRequest;
use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use joblet_proto::persist::{JobSummary, ListJobsRequest};
use tonic::transport::Channel;

use crate::config::Node;
use crate::{Failure, connect};

/// Records persist may miss of a running job before rnx says so.
const BEHIND_WARNING: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Logs,
    Metrics,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Logs => "lines",
            Kind::Metrics => "samples",
        }
    }
}

/// Which records come from where: persist's history up to `through` when `history`, core
/// after `through`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plan {
    pub history: bool,
    pub through: u64,
}

pub struct Sources {
    pub core: Option<JobServiceClient<Channel>>,
    /// Why core could not be reached, if it could not.
    pub core_error: Option<Failure>,
    pub persist: Option<PersistServiceClient<Channel>>,
    /// The full job id once resolved (core accepts prefixes), else what the user typed.
    pub job_id: String,
    /// Core still holds the job (so it can serve everything after persist's history).
    pub core_has_job: bool,
}

impl Sources {
    /// Connects to both daemons (warning once if persist is unreachable) and resolves `id` on
    /// core. Fails only if neither daemon answers.
    pub async fn open(node: &Node, id: &str) -> Result<Sources, Failure> {
        let (mut core, core_error) = match connect::core(node).await {
            Ok(client) => (Some(client), None),
            Err(failure) => (None, Some(failure)),
        };
        let persist = connect::persist(node).await.unwrap_or_else(|failure| {
            eprintln!("rnx: warning: {failure}; reading everything from joblet-core");
            None
        });
        if core.is_none() && persist.is_none() {
            return Err(
                core_error.unwrap_or_else(|| Failure::Unavailable("no daemon reachable".into()))
            );
        }
        let mut job_id = id.to_owned();
        let mut core_has_job = false;
        if let Some(client) = core.as_mut() {
            match client
                .get_job_status(GetJobStatusRequest {
                    uuid: id.to_owned(),
                })
                .await
            {
                Ok(status) => {
                    let status = status.into_inner();
                    job_id = status.uuid;
                    // A job core let go is answered from persist's catalogue.
                    core_has_job = !status.history;
                }
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(status.into()),
            }
        }
        Ok(Sources {
            core,
            core_error,
            persist,
            job_id,
            core_has_job,
        })
    }

    /// Where the job's records of `kind` come from. persist's history serves them up to its
    /// highest sequence when it holds every one of them (sequences start at 1) or core no
    /// longer has the job; core serves the rest (all of them otherwise). Warns when persist is
    /// far behind (still catching up after an outage), not when it merely trails a running job.
    pub async fn plan(&mut self, kind: Kind) -> Plan {
        let Some(summary) = self.summary().await else {
            return Plan::default();
        };
        let (stored, highest) = match kind {
            Kind::Logs => (summary.log_lines, summary.last_log_sequence),
            Kind::Metrics => (summary.metric_samples, summary.last_metric_sequence),
        };
        // Lines persist could not take (gap markers) core may still hold whole.
        let gaps = kind == Kind::Logs && summary.lost_lines > 0;
        if (stored == highest && !gaps) || !self.core_has_job {
            return Plan {
                history: true,
                through: highest,
            };
        }
        let missing = highest.saturating_sub(stored);
        if missing > BEHIND_WARNING && !gaps {
            eprintln!(
                "rnx: warning: joblet-persist misses {missing} {} of this job; reading everything from joblet-core",
                kind.noun()
            );
        }
        Plan::default()
    }

    /// When core cannot continue after the history (it no longer has the job, or is down):
    /// the history shown is all there is (said when core is down), or the job is not found.
    pub fn without_core(&self, plan: Plan, id: &str) -> Result<(), Failure> {
        if !plan.history {
            return Err(Failure::Remote(tonic::Status::not_found(format!(
                "job {id:?} not found"
            ))));
        }
        if let Some(error) = &self.core_error {
            eprintln!("rnx: warning: {error}; showing history only");
        }
        Ok(())
    }

    /// persist's summary of the job: by full id, or by a unique prefix when core no longer
    /// knows the job. Adopts the summary's full id.
    pub async fn summary(&mut self) -> Option<JobSummary> {
        let client = self.persist.as_mut()?;
        let summaries = client
            .list_jobs(ListJobsRequest {
                job_id_prefix: self.job_id.clone(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().jobs)
            .unwrap_or_default();
        let summary = summaries
            .iter()
            .find(|s| s.job_id == self.job_id)
            .or_else(|| (summaries.len() == 1 && !self.core_has_job).then(|| &summaries[0]))
            .cloned()?;
        self.job_id = summary.job_id.clone();
        Some(summary)
    }
}
