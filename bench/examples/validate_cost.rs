//! The registry's checks of one Register and one heartbeat, alone and
//! in-process: `validate_cost registration|beat [N]` runs N of them (the
//! simulator's 8-GPU, 2-pool node) and prints the time per call. For
//! figures that do not move with the machine's load, count instructions:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!   --toggle-collect='registry_server::validate::registration*' \
//!   target/release/examples/validate_cost registration 10000
//! ```
//!
//! (`...::beat*` for heartbeats) and divide the total by N.

use std::time::{Duration, Instant};

use fleet_sim::fake::NodeShape;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "registration".into());
    let n: usize = args
        .next()
        .map_or(100_000, |n| n.parse().expect("N: a count"));
    let shape = |index: usize| NodeShape {
        index,
        node_id: format!("sim-{index:06}"),
        gpus: 8,
        pools: 2,
        churn: true,
        all_gpu_figures: false,
        unhealthy_gpu: false,
    };
    let (elapsed, ok) = match what.as_str() {
        "registration" => {
            let requests: Vec<_> = (0..n).map(|i| shape(i).registration()).collect();
            let start = Instant::now();
            let ok = requests
                .into_iter()
                .map(registry_server::validate::registration)
                .filter(Result::is_ok)
                .count();
            (start.elapsed(), ok)
        }
        "beat" => {
            let node = shape(3);
            let mut rng = fastrand::Rng::with_seed(7);
            let mut beats: Vec<_> = (0..n)
                .map(|i| node.heartbeat(1, "secret", i as u64 + 2, false, &mut rng))
                .collect();
            let now = chrono::Utc::now();
            let start = Instant::now();
            let ok = beats
                .iter_mut()
                .map(|b| registry_server::validate::beat(b, now, Duration::from_secs(3600)))
                .filter(Result::is_ok)
                .count();
            (start.elapsed(), ok)
        }
        other => panic!("{other}: registration or beat"),
    };
    assert_eq!(ok, n, "every simulated {what} passes");
    println!(
        "{what}: {n} checked, {:.0} ns each",
        elapsed.as_nanos() as f64 / n as f64
    );
}
