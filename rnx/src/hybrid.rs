//! What `job log` and `job metrics` share: both daemons' clients, the job's full id, and
//! persist's summary of the job (which tells up to which sequence its history is complete).

use joblet_proto::joblet::GetJobStatusRequest;
use joblet_proto::joblet::job_service_client::JobServiceClient;
use joblet_proto::persist::persist_service_client::PersistServiceClient;
use joblet_proto::persist::{JobSummary, ListJobsRequest};
use tonic::transport::Channel;

use crate::config::Node;
use crate::{Failure, connect};

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
