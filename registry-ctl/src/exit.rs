//! registry-ctl's exit statuses: what a script can rely on.

use std::process::ExitCode;

/// The text `--help` shows after the flags; README.md says the same.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  found / ok (health: SERVING; agent-check: the node is ONLINE)
  1  not found or nothing matched (get of an absent node, list matching no
     node, find finding no pool, models listing none, cordon/drain of an
     unknown node, a drain cancelled while drain --wait follows it), not healthy (health: not SERVING; agent-check: OFFLINE or
     absent), or the output could not be written
  2  usage error: bad flags (clap), an unusable token, token file, TLS file
     or URL, or an argument the registry refused (INVALID_ARGUMENT)
  3  cannot reach the registry: connection refused, TLS failure,
     UNAUTHENTICATED / PERMISSION_DENIED (bad or missing token), deadline
     exceeded, or any other failed call; the reason is on stderr
  4  watch: the revision to resume from is compacted (OUT_OF_RANGE): relist
     (list) and watch again from the listing's revision
  5  drain --wait: the node was not drained within --wait-timeout (the
     drain goes on; `undrain` cancels it)
`status` prints \"absent\" for an unknown node and exits 0: it answered.";

/// How a run of registry-ctl ended, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: found, ok, healthy.
    Ok,
    /// 1: the answer is no: not found, nothing matched, not healthy.
    No,
    /// 2: usage error: flags, local files, or an argument the registry
    /// refused.
    Usage,
    /// 3: the registry could not be reached or its answer was a failure.
    Unreachable,
    /// 4: a watch's revision is older than the registry's history.
    Compacted,
    /// 5: `drain --wait` gave up before the node was drained.
    NotDrained,
}

impl Exit {
    /// The numeric exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::No => 1,
            Exit::Usage => 2,
            Exit::Unreachable => 3,
            Exit::Compacted => 4,
            Exit::NotDrained => 5,
        }
    }

    /// `Ok` when `yes`, `No` otherwise.
    pub fn from_answer(yes: bool) -> Self {
        if yes { Exit::Ok } else { Exit::No }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_ones() {
        assert_eq!(Exit::Ok.code(), 0);
        assert_eq!(Exit::No.code(), 1);
        assert_eq!(Exit::Usage.code(), 2);
        assert_eq!(Exit::Unreachable.code(), 3);
        assert_eq!(Exit::Compacted.code(), 4);
        assert_eq!(Exit::NotDrained.code(), 5);
        assert_eq!(Exit::from_answer(true), Exit::Ok);
        assert_eq!(Exit::from_answer(false), Exit::No);
    }

    #[test]
    fn clap_usage_errors_are_two_like_ours() {
        use clap::Parser;
        let err = crate::cli::Cli::try_parse_from(["registry-ctl", "--output", "yaml", "list"])
            .unwrap_err();
        assert_eq!(err.exit_code(), i32::from(Exit::Usage.code()));
    }
}
