//! Facts about the host the agent runs on: its name, machine id, CPU cores
//! and memory. Linux-only sources (`/proc`, `/etc`) with portable fallbacks,
//! read without any unsafe FFI.

use std::path::Path;

/// The kernel's hostname: `/proc/sys/kernel/hostname`, else `/etc/hostname`,
/// else `$HOSTNAME`. `None` when none of them gives a non-empty name.
pub fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| read_trimmed(Path::new(p)))
        .or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
}

/// `/etc/machine-id` (systemd's stable host identifier), else the hostname.
pub fn machine_id() -> Option<String> {
    read_trimmed(Path::new("/etc/machine-id")).or_else(hostname)
}

/// Turns a hostname into a node id (a DNS label): the first label, lower
/// case, every other character replaced by `-`, at most 63 characters, no
/// leading or trailing `-`. `None` when nothing usable is left.
pub fn node_id_from_hostname(hostname: &str) -> Option<String> {
    let first = hostname.split('.').next().unwrap_or_default();
    let mapped: String = first
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let cut: String = trimmed.chars().take(63).collect();
    let cut = cut.trim_end_matches('-');
    (!cut.is_empty()).then(|| cut.to_owned())
}

/// Logical CPU cores available to the agent (honours affinity and cgroup
/// quotas, which is what an orchestrator can actually use).
pub fn cpu_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// Total host memory in bytes from `/proc/meminfo`; 0 where unknown.
pub fn ram_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_meminfo_total(&s))
        .unwrap_or(0)
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => value.checked_mul(1024),
        _ => None,
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_from_hostname_makes_a_dns_label() {
        assert_eq!(node_id_from_hostname("gpu-01").as_deref(), Some("gpu-01"));
        assert_eq!(
            node_id_from_hostname("GPU_01.example.com").as_deref(),
            Some("gpu-01")
        );
        assert_eq!(node_id_from_hostname("-x-").as_deref(), Some("x"));
        assert_eq!(node_id_from_hostname("___"), None);
        assert_eq!(node_id_from_hostname(""), None);
        let long = "a".repeat(62) + "-b";
        assert_eq!(node_id_from_hostname(&long).unwrap(), "a".repeat(62));
    }

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let meminfo = "MemTotal:       16318412 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(16_318_412 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }
}
