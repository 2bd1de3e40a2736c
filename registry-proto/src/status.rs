//! Words for what went wrong, shared by every program that speaks the
//! contract: the canonical name of a gRPC status code, and an error with
//! its causes on one line (tonic's message alone rarely says what failed:
//! "transport error" hides "tcp connect error: Connection refused").

use tonic::Code;

/// The canonical upper-case name of a status code ("NOT_FOUND"), as
/// grpcurl and the gRPC documentation write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its causes, "a: b: c", each cause once (a cause whose text
/// the line already holds is not repeated).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    with_causes(error.to_string(), error.source())
}

/// A gRPC status as its message followed by its causes: the code is left
/// out, for callers that name it themselves.
pub fn status_chain(status: &tonic::Status) -> String {
    with_causes(
        status.message().to_owned(),
        std::error::Error::source(status),
    )
}

fn with_causes(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("tls handshake failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chains_list_every_cause_once() {
        let error = Outer(std::io::Error::other("connection refused"));
        assert_eq!(
            error_chain(&error),
            "tls handshake failed: connection refused"
        );
        let repeated = Outer(std::io::Error::other("tls handshake failed"));
        assert_eq!(error_chain(&repeated), "tls handshake failed");
    }

    #[test]
    fn a_status_is_its_message_and_causes() {
        let status = tonic::Status::from_error(Box::new(Outer(std::io::Error::other("refused"))));
        let text = status_chain(&status);
        assert!(text.contains("tls handshake failed"), "{text}");
        assert!(text.ends_with("refused"), "{text}");
        assert_eq!(status_chain(&tonic::Status::not_found("gone")), "gone");
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(Code::Ok), "OK");
    }
}
