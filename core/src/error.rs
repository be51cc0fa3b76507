//! Errors of joblet-core's job API; [`CoreError::into_status`] is the one mapping to gRPC.

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("job {0:?} not found")]
    NotFound(String),
    #[error("job id prefix {prefix:?} matches {count} jobs; give more characters")]
    Ambiguous { prefix: String, count: usize },
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl CoreError {
    pub fn into_status(self) -> tonic::Status {
        match self {
            CoreError::NotFound(_) => tonic::Status::not_found(self.to_string()),
            CoreError::Ambiguous { .. } | CoreError::InvalidArgument { .. } => {
                tonic::Status::invalid_argument(self.to_string())
            }
            CoreError::FailedPrecondition(_) => {
                tonic::Status::failed_precondition(self.to_string())
            }
            CoreError::Internal(_) => {
                tracing::error!(error = %self, "internal error");
                tonic::Status::internal(self.to_string())
            }
        }
    }
}
