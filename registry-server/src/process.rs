//! Process metrics with the names of Prometheus' client libraries, read
//! from Linux' `/proc` once a second by the metrics publisher:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_start_time_seconds`.
//! Read by hand rather than through a crate: five numbers from three files.
//! Elsewhere than Linux nothing is published.

use metrics::{describe_gauge, gauge};

/// CPU time, user and system, in seconds.
pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
/// Resident set size in bytes.
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
/// Open file descriptors.
pub const OPEN_FDS: &str = "process_open_fds";
/// The open-file limit (soft).
pub const MAX_FDS: &str = "process_max_fds";
/// Start time, seconds since the Unix epoch.
pub const START_TIME: &str = "process_start_time_seconds";

/// Clock ticks per second of `/proc/*/stat` (USER_HZ, 100 on every Linux
/// architecture's ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of the process' figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU seconds.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// Soft limit on open files; `None` when unlimited.
    pub max_fds: Option<u64>,
    /// Start, seconds since the epoch.
    pub start_time: f64,
}

/// Describes the process metrics.
pub fn describe() {
    describe_gauge!(
        CPU_SECONDS,
        "Total user and system CPU time spent in seconds."
    );
    describe_gauge!(RESIDENT_MEMORY, "Resident memory size in bytes.");
    describe_gauge!(OPEN_FDS, "Number of open file descriptors.");
    describe_gauge!(MAX_FDS, "Maximum number of open file descriptors.");
    describe_gauge!(
        START_TIME,
        "Start time of the process since unix epoch in seconds."
    );
}

/// Reads `/proc/self` and sets the metrics; does nothing where it cannot.
pub fn publish() {
    let Some(stats) = read() else {
        return;
    };
    // The `metrics` crate's counters hold whole numbers, too coarse for
    // CPU seconds; the figure is exported as a gauge under the counter's
    // usual name (the text format carries the float, and rate() works the
    // same on a value that only grows).
    gauge!(CPU_SECONDS).set(stats.cpu_seconds);
    gauge!(RESIDENT_MEMORY).set(stats.resident_bytes as f64);
    gauge!(OPEN_FDS).set(stats.open_fds as f64);
    if let Some(max) = stats.max_fds {
        gauge!(MAX_FDS).set(max as f64);
    }
    gauge!(START_TIME).set(stats.start_time);
}

/// Reads the figures of this process, or `None` without a `/proc`.
pub fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse(&stat, &boot, &status, &limits, open_fds()?)
}

/// The number of open file descriptors. Linux 6.2 and later report it as
/// the size of `/proc/self/fd`, read from the descriptor table's bitmap;
/// listing the directory instead looks up every descriptor, which with
/// 10,000 agent connections took ~7 % of the server's CPU at 1,000
/// heartbeats/s (a listing a second). Older kernels report size 0 and get
/// the listing.
fn open_fds() -> Option<u64> {
    let size = std::fs::metadata("/proc/self/fd").ok()?.len();
    if size > 0 {
        return Some(size);
    }
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// The figures from the texts of `/proc/self/stat`, `/proc/stat`,
/// `/proc/self/status` and `/proc/self/limits`.
pub fn parse(
    stat: &str,
    boot: &str,
    status: &str,
    limits: &str,
    open_fds: u64,
) -> Option<ProcessStats> {
    // The command name, field 2, is in parentheses and may hold spaces:
    // the fields after the last ')' start with field 3 (state).
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    let cpu_seconds = (field(14)? + field(15)?) / TICKS_PER_SECOND;
    let start_ticks = field(22)?;
    let btime: f64 = boot
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let resident_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let max_fds = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok());
    Some(ProcessStats {
        cpu_seconds,
        resident_bytes: resident_kib * 1024,
        open_fds,
        max_fds,
        start_time: btime + start_ticks / TICKS_PER_SECOND,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_texts_are_parsed() {
        let stat = "4242 (registry (x) srv) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 50 0 0 20 0 9 0 123400 1000000 5000 18446744073709551615";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let status = "Name:\tregistry-server\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let stats = parse(stat, boot, status, limits, 17).unwrap();
        assert_eq!(stats.cpu_seconds, 3.0);
        assert_eq!(stats.resident_bytes, 20480 * 1024);
        assert_eq!(stats.open_fds, 17);
        assert_eq!(stats.max_fds, Some(1024));
        assert_eq!(stats.start_time, 1_700_000_000.0 + 1234.0);
    }

    #[test]
    fn this_process_is_read_on_linux() {
        let stats = read().expect("/proc is readable on Linux");
        assert!(stats.resident_bytes > 0);
        assert!(stats.open_fds > 0);
        // The count sees descriptors this test holds open (a lower bound:
        // other tests open and close files in parallel).
        let files: Vec<std::fs::File> = (0..200)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let counted = open_fds().unwrap();
        assert!(counted >= 200, "{counted} open with 200 held");
        drop(files);
        assert!(stats.start_time > 1_600_000_000.0);
    }
}
