use std::path::PathBuf;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "invalid volume or snapshot name {0:?}: 1-200 characters of [a-z0-9._-], starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("volume {0:?} already exists")]
    AlreadyExists(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("snapshot {snap:?} of volume {volume:?} not found")]
    SnapshotNotFound { volume: String, snap: String },
    #[error("snapshot {snap:?} of volume {volume:?} already exists")]
    SnapshotExists { volume: String, snap: String },
    #[error("cannot shrink volume {volume:?} from {from} to {to} bytes")]
    Shrink { volume: String, from: u64, to: u64 },
    #[error("{path}: {message}")]
    Pool { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` could not be run: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("unexpected output of `{command}`: {message}")]
    Output { command: String, message: String },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.into(),
            source,
        }
    }
}
