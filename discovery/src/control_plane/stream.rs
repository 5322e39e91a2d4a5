//! Why one of a session's streams (`Subscribe`, `Register`) failed: shared
//! by [`super::session`], which ends the session on it, and
//! [`super::register`], whose stream reports it.

/// Why a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{stream} stream failed: {code:?}: {message}")]
    Status {
        stream: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("{stream} stream ended by the control plane")]
    Ended { stream: &'static str },
}

impl StreamError {
    pub fn status(stream: &'static str, status: tonic::Status) -> Self {
        Self::Status {
            stream,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}
