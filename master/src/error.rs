//! What can go wrong in a metadata operation, as callers need to branch on it, and its one
//! translation to gRPC.

use cairn_proto::v1::{CommandError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("not a directory: {0}")]
    NotADirectory(String),
    #[error("is a directory: {0}")]
    IsADirectory(String),
    #[error("directory not empty: {0}")]
    NotEmpty(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no such attribute: {0}")]
    NoAttribute(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("name too long: {0}")]
    NameTooLong(String),
    /// A commit made from an older version of the file.
    #[error("changed meanwhile: {0}")]
    Changed(String),
    #[error("not enough chunkservers: {0}")]
    NotEnoughChunkservers(String),
    #[error("not the leader")]
    NotLeader { hint: Option<String> },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// gRPC metadata key naming the error kind where the status code alone is ambiguous.
pub const ERROR_KIND_KEY: &str = "cairn-error";

impl MetaError {
    pub fn from_command(e: CommandError) -> MetaError {
        let m = e.message;
        match ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified) {
            ErrorCode::NotFound => MetaError::NotFound(m),
            ErrorCode::AlreadyExists => MetaError::AlreadyExists(m),
            ErrorCode::NotADirectory => MetaError::NotADirectory(m),
            ErrorCode::IsADirectory => MetaError::IsADirectory(m),
            ErrorCode::NotEmpty => MetaError::NotEmpty(m),
            ErrorCode::InvalidArgument => MetaError::InvalidArgument(m),
            ErrorCode::NoAttribute => MetaError::NoAttribute(m),
            ErrorCode::NotPermitted => MetaError::NotPermitted(m),
            ErrorCode::NameTooLong => MetaError::NameTooLong(m),
            ErrorCode::Changed => MetaError::Changed(m),
            ErrorCode::Unspecified => MetaError::Internal(anyhow::anyhow!("unknown error code: {m}")),
        }
    }

    /// The form a failed command takes in the replicated log; `None` for errors that never come
    /// out of apply (those abort it instead).
    pub fn to_command(&self) -> Option<CommandError> {
        let (code, m) = match self {
            MetaError::NotFound(m) => (ErrorCode::NotFound, m),
            MetaError::AlreadyExists(m) => (ErrorCode::AlreadyExists, m),
            MetaError::NotADirectory(m) => (ErrorCode::NotADirectory, m),
            MetaError::IsADirectory(m) => (ErrorCode::IsADirectory, m),
            MetaError::NotEmpty(m) => (ErrorCode::NotEmpty, m),
            MetaError::InvalidArgument(m) => (ErrorCode::InvalidArgument, m),
            MetaError::NoAttribute(m) => (ErrorCode::NoAttribute, m),
            MetaError::NotPermitted(m) => (ErrorCode::NotPermitted, m),
            MetaError::NameTooLong(m) => (ErrorCode::NameTooLong, m),
            MetaError::Changed(m) => (ErrorCode::Changed, m),
            _ => return None,
        };
        Some(CommandError { code: code as i32, message: m.clone() })
    }
}

impl From<redb::Error> for MetaError {
    fn from(e: redb::Error) -> Self {
        MetaError::Internal(anyhow::Error::new(e).context("metadata store"))
    }
}

impl From<MetaError> for tonic::Status {
    fn from(e: MetaError) -> tonic::Status {
        use tonic::{Code, Status};
        let (code, kind) = match &e {
            MetaError::NotFound(_) => (Code::NotFound, "not_found"),
            MetaError::AlreadyExists(_) => (Code::AlreadyExists, "already_exists"),
            MetaError::NotADirectory(_) => (Code::FailedPrecondition, "not_a_directory"),
            MetaError::IsADirectory(_) => (Code::FailedPrecondition, "is_a_directory"),
            MetaError::NotEmpty(_) => (Code::FailedPrecondition, "not_empty"),
            MetaError::InvalidArgument(_) => (Code::InvalidArgument, "invalid_argument"),
            MetaError::NoAttribute(_) => (Code::NotFound, "no_attribute"),
            MetaError::NotPermitted(_) => (Code::PermissionDenied, "not_permitted"),
            MetaError::NameTooLong(_) => (Code::InvalidArgument, "name_too_long"),
            MetaError::Changed(_) => (Code::Aborted, "changed"),
            MetaError::NotEnoughChunkservers(_) => (Code::ResourceExhausted, "not_enough_chunkservers"),
            MetaError::NotLeader { .. } => (Code::Unavailable, "not_leader"),
            MetaError::Unavailable(_) => (Code::Unavailable, "unavailable"),
            MetaError::Internal(_) => (Code::Internal, "internal"),
        };
        let msg = match &e {
            MetaError::NotFound(m)
            | MetaError::AlreadyExists(m)
            | MetaError::NotADirectory(m)
            | MetaError::IsADirectory(m)
            | MetaError::NotEmpty(m)
            | MetaError::InvalidArgument(m)
            | MetaError::NoAttribute(m)
            | MetaError::NotPermitted(m)
            | MetaError::NameTooLong(m)
            | MetaError::Changed(m)
            | MetaError::NotEnoughChunkservers(m)
            | MetaError::Unavailable(m) => m.clone(),
            other => other.to_string(),
        };
        let mut status = Status::new(code, msg);
        status.metadata_mut().insert(ERROR_KIND_KEY, kind.parse().expect("ascii kind"));
        if let MetaError::NotLeader { hint: Some(h) } = &e {
            if let Ok(v) = h.parse() {
                status.metadata_mut().insert(cairn_proto::LEADER_HINT_KEY, v);
            }
        }
        status
    }
}
