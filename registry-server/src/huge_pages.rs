//! Whether the kernel may back the registry's memory with transparent huge
//! pages (`--huge-pages`, off by default).
//!
//! mimalloc asks for huge pages on the arenas it takes from the kernel
//! (`madvise(MADV_HUGEPAGE)`), and the kernel then makes a whole 2 MiB page
//! resident at the first write to any byte of it. Much of what an agent's
//! connection allocates is never written: h2 gives every connection a
//! 16 KiB write buffer, rewound after every flush, of which a heartbeat
//! stream's ~100-byte acks use the start. With 4 KiB pages the untouched
//! pages never become resident; with huge pages they do. Measured
//! (docs/PERF-NOTES.md item 10): 10,000 agents with one connection each
//! need 33 KiB per node with huge pages off against 49 KiB with them on;
//! 100,000 nodes sharing 1,000 connections 8.8 against 9.0 KiB. The price
//! is in registration storms, where memory grows by hundreds of MiB in
//! seconds: with 4 KiB pages the server takes in 5-15 % fewer Registers
//! per second (far more page faults, more TLB misses), and steady CPU may
//! be half a point higher at 10,000 agents (inside the runs' spread).
//! Off by default, since agents connect one connection each;
//! `--huge-pages on` suits a registry that lives through storms more than
//! it holds large fleets.
//!
//! The switch is the kernel's per-process one (`prctl(PR_SET_THP_DISABLE)`,
//! the one mimalloc's own `MIMALLOC_ALLOW_THP=0` sets): it covers every
//! thread and what is already mapped, so it may be flipped after the
//! allocator started. Elsewhere than Linux there is nothing to switch.

use clap::ValueEnum;

/// Whether transparent huge pages may back the process' memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HugePages {
    /// 4 KiB pages only: memory is resident only where it was written.
    Off,
    /// As the system's transparent huge page policy says (mimalloc asks
    /// for them on its arenas).
    On,
}

/// Applies `choice` to this process (nothing to do elsewhere than Linux).
///
/// # Errors
/// The kernel refused the switch (a seccomp filter, say); the process then
/// runs with the system's policy.
pub fn apply(choice: HugePages) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(choice == HugePages::Off)?;
    #[cfg(not(target_os = "linux"))]
    let _ = choice;
    Ok(())
}

/// What the process runs with now, for the start-up log line: `"off"`,
/// `"on"`, or `"unknown"` where it cannot be read.
pub fn current() -> &'static str {
    #[cfg(target_os = "linux")]
    if let Ok(disabled) = rustix::thread::transparent_huge_pages_are_disabled() {
        return if disabled { "off" } else { "on" };
    }
    "unknown"
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Both ways, in one test: the switch is the whole process'.
    #[test]
    fn the_switch_is_read_back_as_set() {
        apply(HugePages::Off).unwrap();
        assert_eq!(current(), "off");
        apply(HugePages::On).unwrap();
        assert_eq!(current(), "on");
    }
}
