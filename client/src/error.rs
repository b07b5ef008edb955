//! Errors of the client library, by what happened to the caller. The CLI prints them as one line;
//! the FUSE mount and the S3 gateway map them to errno and S3 codes.

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no such attribute: {0}")]
    NoAttribute(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("name too long: {0}")]
    NameTooLong(String),
    /// A commit made from a version of the file that another commit replaced meanwhile.
    #[error("changed meanwhile: {0}")]
    Changed(String),
    /// A file would grow past [`cairn_proto::MAX_FILE_SIZE`] (or past its chunk count).
    #[error("file too large: {0}")]
    TooLarge(String),
    #[error("not enough chunkservers: {0}")]
    NotEnoughChunkservers(String),
    /// The masters could not be reached, or did not answer, within the deadline.
    #[error("masters unavailable: {0}")]
    Unavailable(String),
    /// No replica of a chunk could be read.
    #[error("chunk {hash} unavailable: {reason}")]
    ChunkUnavailable { hash: String, reason: String },
    /// Storing a chunk on its replicas failed.
    #[error("upload of chunk {hash} failed: {reason}")]
    Upload { hash: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// From a master's gRPC answer: the code, refined by the kind the master attaches.
    pub(crate) fn from_status(s: &tonic::Status) -> Error {
        let kind = s.metadata().get("cairn-error").and_then(|v| v.to_str().ok()).unwrap_or("");
        let m = s.message().to_string();
        match (s.code(), kind) {
            (_, "no_attribute") => Error::NoAttribute(m),
            (_, "not_permitted") => Error::NotPermitted(m),
            (_, "name_too_long") => Error::NameTooLong(m),
            (_, "changed") => Error::Changed(m),
            (tonic::Code::NotFound, _) => Error::NotFound(m),
            (tonic::Code::AlreadyExists, _) => Error::AlreadyExists(m),
            (_, "not_a_directory") => Error::NotADirectory(m),
            (_, "is_a_directory") => Error::IsADirectory(m),
            (_, "not_empty") => Error::NotEmpty(m),
            (tonic::Code::InvalidArgument, _) => Error::InvalidArgument(m),
            (tonic::Code::ResourceExhausted, _) => Error::NotEnoughChunkservers(m),
            (tonic::Code::Unavailable | tonic::Code::DeadlineExceeded, _) => Error::Unavailable(m),
            (code, _) => Error::Internal(format!("{code:?}: {m}")),
        }
    }
}
