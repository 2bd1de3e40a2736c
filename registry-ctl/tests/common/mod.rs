//! What both registry-ctl test files check of a finished run.

use std::process::Output;

/// The run's stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The run's stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// The exit status, with stdout and stderr in the message when it differs.
#[track_caller]
pub fn assert_exit(output: &Output, want: i32) {
    assert_eq!(
        output.status.code(),
        Some(want),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
}
