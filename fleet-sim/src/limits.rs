//! What the simulator asks of the kernel for itself: the open-file limit
//! (every HTTP/2 connection is one file descriptor, so a fleet of one
//! connection per node needs a soft limit above the node count), and 4 KiB
//! pages.

use crate::error::SimError;

/// Descriptors kept free for everything that is not a node connection
/// (stdio, the runtime, a ListNodes client, log files).
pub const RESERVED_FDS: u64 = 64;

/// Raises this process's soft open-file limit to its hard limit and returns
/// the new soft limit. Without unsafe code: `rlimit` wraps getrlimit and
/// setrlimit.
pub fn raise_nofile_limit() -> Result<u64, SimError> {
    rlimit::increase_nofile_limit(u64::MAX).map_err(SimError::FileLimit)
}

/// Refuses a connection count that the open-file limit cannot hold, naming
/// the way out.
pub fn check_connections(connections: usize, soft_limit: u64) -> Result<(), SimError> {
    let needed = connections as u64 + RESERVED_FDS;
    if needed > soft_limit {
        return Err(SimError::Config(format!(
            "{connections} connections need about {needed} open files but the limit is {soft_limit}: \
             raise the hard limit (ulimit -Hn) or share connections with --connections"
        )));
    }
    Ok(())
}

/// Turns transparent huge pages off for this process, as the registry does
/// by default (its `--huge-pages`). A simulated fleet grows by ~1 GiB in a
/// registration storm of 100,000 nodes; with huge pages every fault zeroes
/// 2 MiB at once, and on a small VM the first touch of such pages cost the
/// simulator ~45 % of its CPU in the storm, CPU the registry it measures
/// shares (docs/PERF-NOTES.md item 4). Inherited by processes started
/// afterwards: the registry sets its own choice at start, and the bench
/// starts etcd members under [`system_pages`]. Does nothing elsewhere than
/// Linux.
///
/// # Errors
/// The kernel refused (a seccomp filter, say); the fleet then runs with the
/// system's policy.
pub fn small_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

/// Gives this process, and those it starts from now on, the system's huge
/// page policy again (the other side of [`small_pages`]).
///
/// # Errors
/// The kernel refused.
pub fn system_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_connections_for_the_limit_are_refused() {
        check_connections(1000, 20_000).unwrap();
        let err = check_connections(19_990, 20_000).unwrap_err().to_string();
        assert!(err.contains("--connections"), "{err}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_turned_off_and_on_again() {
        small_pages().unwrap();
        assert!(rustix::thread::transparent_huge_pages_are_disabled().unwrap());
        system_pages().unwrap();
        assert!(!rustix::thread::transparent_huge_pages_are_disabled().unwrap());
    }

    #[test]
    fn the_soft_limit_can_be_raised_to_the_hard_one() {
        let soft = raise_nofile_limit().unwrap();
        let (now_soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        assert_eq!(soft, now_soft);
        assert!(soft <= hard);
    }
}
