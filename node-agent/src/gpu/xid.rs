//! Critical XID errors from an NVML event set, watched on a background OS
//! thread: `nvmlEventSetWait` blocks, so it must stay off the async
//! runtime. The thread records each XID with its GPU and time; readings
//! report the XIDs of the last `window`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use registry_proto::rules::MAX_XID_ERRORS;

/// How long one wait blocks before the thread checks whether to stop.
const WAIT_MS: u32 = 1000;
/// XIDs kept at most; older ones are dropped first.
const KEPT: usize = 256;

/// XIDs seen, shared between the watcher thread and the readings.
#[derive(Debug, Default)]
pub struct XidLog {
    /// (GPU index, XID, when), oldest first.
    seen: Mutex<VecDeque<(u32, u32, Instant)>>,
}

impl XidLog {
    /// Records `xid` on `gpu` at `at`.
    pub fn record(&self, gpu: u32, xid: u32, at: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() == KEPT {
            seen.pop_front();
        }
        seen.push_back((gpu, xid, at));
    }

    /// The distinct XIDs of `gpu` seen within `window` before `now`,
    /// oldest first, at most the contract's limit.
    pub fn recent(&self, gpu: u32, window: Duration, now: Instant) -> Vec<u32> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut xids = Vec::new();
        for &(g, xid, at) in seen.iter() {
            if g == gpu && now.saturating_duration_since(at) < window && !xids.contains(&xid) {
                xids.push(xid);
            }
        }
        xids.truncate(MAX_XID_ERRORS);
        xids
    }
}

/// The watcher thread; stopped (and joined) on drop.
pub struct XidWatcher {
    /// Set to stop the thread at its next wake-up.
    stop: Arc<AtomicBool>,
    /// The thread, joined on drop.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl XidWatcher {
    /// Starts watching every GPU of `nvml` that supports XID events,
    /// recording into `log`. A driver without event support leaves the
    /// thread idle-free: it logs once and ends.
    pub fn start(nvml: Arc<Nvml>, count: u32, log: Arc<XidLog>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("nvml-xid".into()).spawn({
            let stop = stop.clone();
            move || {
                if let Err(e) = watch(&nvml, count, &log, &stop) {
                    tracing::warn!(error = %e, "not watching xid errors");
                }
            }
        })?;
        Ok(XidWatcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for XidWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread's body: registers the GPUs, then waits for events until
/// `stop` is set.
fn watch(nvml: &Nvml, count: u32, log: &XidLog, stop: &AtomicBool) -> Result<(), NvmlError> {
    let mut set = nvml.create_event_set()?;
    let mut watched = 0;
    for index in 0..count {
        let device = nvml.device_by_index(index)?;
        // Checked first: a failed registration consumes the set.
        let supported = device
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !supported {
            tracing::info!(index, "gpu reports no xid events");
            continue;
        }
        set = device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .map_err(|e| e.error)?;
        watched += 1;
    }
    if watched == 0 {
        return Ok(());
    }
    tracing::info!(gpus = watched, "watching xid errors");
    while !stop.load(Ordering::Relaxed) {
        match set.wait(WAIT_MS) {
            Ok(event) => {
                let Some(XidError::Value(xid)) = event.event_data else {
                    continue;
                };
                let Ok(index) = event.device.index() else {
                    continue;
                };
                let xid = u32::try_from(xid).unwrap_or(u32::MAX);
                tracing::warn!(index, xid, "gpu reported a critical xid error");
                log.record(index, xid, Instant::now());
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                // A broken event set would spin: stop watching.
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_xids_are_per_gpu_distinct_and_windowed() {
        let log = XidLog::default();
        let t0 = Instant::now();
        log.record(0, 13, t0);
        log.record(0, 79, t0 + Duration::from_secs(5));
        log.record(0, 79, t0 + Duration::from_secs(6));
        log.record(1, 48, t0);
        let window = Duration::from_secs(60);
        assert_eq!(
            log.recent(0, window, t0 + Duration::from_secs(10)),
            vec![13, 79]
        );
        assert_eq!(
            log.recent(1, window, t0 + Duration::from_secs(10)),
            vec![48]
        );
        // 13 aged out of the window; 79 has not.
        assert_eq!(
            log.recent(0, window, t0 + Duration::from_secs(62)),
            vec![79]
        );
    }
}
