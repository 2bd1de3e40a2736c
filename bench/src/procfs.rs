//! What /proc says about a process: CPU time (utime + stime) and memory
//! (VmRSS now, VmHWM at peak). Linux only, as the benchmarks are.

use std::time::Duration;

use crate::BenchError;

/// Clock ticks per second of /proc/<pid>/stat times. Linux fixes USER_HZ at
/// 100 on every architecture it runs this on; reading it would need libc.
const CLOCK_TICKS: u64 = 100;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// User plus system CPU time consumed so far.
    pub cpu: Duration,
    /// Resident memory now, in bytes.
    pub rss: u64,
    /// Peak resident memory, in bytes.
    pub hwm: u64,
}

/// Reads the counters of process `pid`.
pub fn sample(pid: u32) -> Result<ProcSample, BenchError> {
    let stat = read(pid, "stat")?;
    let status = read(pid, "status")?;
    Ok(ProcSample {
        cpu: parse_cpu(&stat).ok_or_else(|| BenchError::Proc(pid, "stat".into()))?,
        rss: parse_kib(&status, "VmRSS:").ok_or_else(|| BenchError::Proc(pid, "VmRSS".into()))?,
        hwm: parse_kib(&status, "VmHWM:").ok_or_else(|| BenchError::Proc(pid, "VmHWM".into()))?,
    })
}

fn read(pid: u32, file: &str) -> Result<String, BenchError> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .map_err(|e| BenchError::Proc(pid, format!("{file}: {e}")))
}

/// utime + stime from a /proc/<pid>/stat line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last ')'.
fn parse_cpu(stat: &str) -> Option<Duration> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name come state (field 3) ... utime (14), stime (15).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_millis(ticks * 1000 / CLOCK_TICKS))
}

/// A "Key:   123 kB" line of /proc/<pid>/status, in bytes.
fn parse_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// TcpExt ListenOverflows of this network namespace: connections dropped
/// because a listener's accept queue was full (a reconnect storm larger
/// than the listen backlog). None where /proc/net/netstat is unreadable.
pub fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    netstat_value(&netstat, "TcpExt:", "ListenOverflows")
}

/// A value from /proc/net/netstat, whose sections are a header line of
/// names and a line of values, both starting with `section`.
fn netstat_value(netstat: &str, section: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with(section));
    let names = lines.next()?;
    let values = lines.next()?;
    let index = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// CPU use between two samples as a percentage of one core.
pub fn cpu_percent(before: &ProcSample, after: &ProcSample, wall: Duration) -> f64 {
    let cpu = after.cpu.saturating_sub(before.cpu);
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fields_are_found_after_a_name_with_spaces() {
        let stat = "4242 (odd) name) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 50 0 0 20 0 9 0 100 1000 300";
        assert_eq!(parse_cpu(stat), Some(Duration::from_secs(3)));
    }

    #[test]
    fn memory_lines_are_read_in_bytes() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_kib(status, "VmRSS:"), Some(1024 * 1024));
        assert_eq!(parse_kib(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(parse_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn netstat_values_are_found_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 19\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(
            netstat_value(netstat, "TcpExt:", "ListenOverflows"),
            Some(17)
        );
        assert_eq!(netstat_value(netstat, "IpExt:", "InNoRoutes"), Some(3));
        assert_eq!(netstat_value(netstat, "TcpExt:", "Nope"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss > 0 && s.hwm >= s.rss);
    }
}
