//! The mass-failure guard and stall detection on the paused clock: a fleet
//! of 1,000 nodes whose agents the test plays (every live node beats at
//! seconds 5, 15, 25 ... after the start), with a 30 s node timeout and a
//! 10 s heartbeat interval.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::*;

/// The fleet a test drives: its registry and every node's slot and
/// session, and the paused clock's start.
struct Fleet {
    /// The registry under test, its expiry task running.
    registry: Registry,
    /// Stops the expiry task when the test ends.
    _stop: CancellationToken,
    /// Each node's slot and session, by index (node id `n0000` ...).
    nodes: Vec<(Arc<NodeSlot>, u64)>,
    /// Whole seconds since the fleet was registered.
    secs: u64,
}

impl Fleet {
    /// `n` nodes registered at second 0, under `guard`.
    fn start(n: usize, guard: GuardConfig) -> Self {
        let (registry, stop) = start_with(guard);
        let nodes = (0..n)
            .map(|i| {
                let id = format!("n{i:04}");
                let reg = registry.register(registration(&id), Now::read()).unwrap();
                let slot = registry
                    .attach(&id, reg.session_id, &reg.session_secret)
                    .unwrap();
                (slot, reg.session_id)
            })
            .collect();
        Self {
            registry,
            _stop: stop,
            nodes,
            secs: 0,
        }
    }

    /// Moves the clock second by second to `secs`; at every second ending
    /// in 5, each node `alive` says is alive then sends a heartbeat.
    async fn run_to(&mut self, secs: u64, alive: impl Fn(usize, u64) -> bool) {
        while self.secs < secs {
            advance(Duration::from_secs(1)).await;
            self.secs += 1;
            if self.secs % 10 == 5 {
                for (i, (slot, session)) in self.nodes.iter().enumerate() {
                    if alive(i, self.secs) {
                        self.registry
                            .heartbeat(slot, *session, beat(pb::PoolState::Ready), Instant::now())
                            .unwrap();
                    }
                }
            }
        }
    }

    fn node(&self, i: usize) -> pb::Node {
        self.registry.get(&format!("n{i:04}")).unwrap()
    }

    /// How many nodes are OFFLINE and how many are flagged suspect, read
    /// from the nodes' views.
    fn tally(&self) -> (usize, usize) {
        let views: Vec<pb::Node> = (0..self.nodes.len()).map(|i| self.node(i)).collect();
        let offline = views
            .iter()
            .filter(|n| n.status() == pb::NodeStatus::Offline)
            .count();
        let suspect = views.iter().filter(|n| n.suspect).count();
        (offline, suspect)
    }

    fn offline_transitions(&self) -> u64 {
        self.registry
            .stats()
            .offline_transitions
            .load(Ordering::Relaxed)
    }
}

#[tokio::test(start_paused = true)]
async fn sixty_percent_silent_at_once_are_held_suspect_and_recover_without_flapping() {
    let mut fleet = Fleet::start(1000, GuardConfig::default());
    // Everyone beats at 5 s; nodes 0..600 fall silent after that, so their
    // deadlines all pass at 35 s. They come back with the beat at 65 s.
    let alive = |i: usize, s: u64| i >= 600 || s <= 5 || s >= 65;
    fleet.run_to(34, alive).await;
    assert_eq!(fleet.tally(), (0, 0));
    fleet.run_to(36, alive).await;
    assert_eq!(
        fleet.tally(),
        (0, 600),
        "held ONLINE as suspect, none OFFLINE"
    );
    let held = fleet.node(0);
    assert_eq!(held.status(), pb::NodeStatus::Online);
    assert!(
        held.suspect_reason
            .contains("mass-failure guard: 600 of 1000 nodes silent"),
        "{}",
        held.suspect_reason
    );
    assert!(!fleet.node(600).suspect, "a live node is not suspect");
    let status = fleet.registry.guard_status();
    assert!(status.active.is_some());
    assert_eq!((status.held, status.suspect), (600, 600));
    assert!(
        fleet
            .registry
            .degraded()
            .unwrap()
            .contains("600 nodes held ONLINE")
    );
    let stats = fleet.registry.guard_stats();
    assert_eq!(stats.trips.load(Ordering::Relaxed), 1);
    assert_eq!(stats.held_total.load(Ordering::Relaxed), 600);

    // Still held a while later, while they stay silent.
    fleet.run_to(60, alive).await;
    assert_eq!(fleet.tally(), (0, 600));

    // Their heartbeats clear the flag, they never went OFFLINE, and the
    // protection ends by itself (within the one-second check).
    fleet.run_to(66, alive).await;
    assert_eq!(fleet.tally(), (0, 0));
    assert_eq!(fleet.registry.guard_status().active, None);
    assert_eq!(fleet.registry.degraded(), None);
    fleet.run_to(200, alive).await;
    assert_eq!(fleet.tally(), (0, 0));
    assert_eq!(fleet.offline_transitions(), 0, "no node flapped OFFLINE");
    assert_eq!(
        fleet.registry.counts(),
        Counts {
            online: 1000,
            offline: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn ten_percent_silent_go_offline_exactly_at_their_deadlines() {
    let mut fleet = Fleet::start(1000, GuardConfig::default());
    let alive = |i: usize, s: u64| i >= 100 || s <= 5;
    fleet.run_to(34, alive).await;
    // The last beat of nodes 0..100 was at 5 s: deadline 35 s.
    advance(Duration::from_secs(1) - MS).await;
    assert_eq!(fleet.tally(), (0, 0));
    advance(2 * MS).await;
    assert_eq!(fleet.tally(), (100, 0));
    assert_eq!(fleet.offline_transitions(), 100);
    assert_eq!(fleet.registry.guard_status().active, None);
    assert_eq!(
        fleet.registry.guard_stats().trips.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_dying_during_protection_goes_offline_when_the_protection_ends() {
    let guard = GuardConfig::default();
    let mut fleet = Fleet::start(1000, guard);
    // 600 silent from 5 s on (the guard trips at 35 s, protection until
    // 335 s); node 700 dies later, at 95 s (deadline 125 s).
    let alive = |i: usize, s: u64| (i >= 600 && i != 700) || s <= 5 || (i == 700 && s <= 95);
    fleet.run_to(130, alive).await;
    assert_eq!(fleet.tally(), (0, 601));
    assert!(fleet.node(700).suspect, "held like the others");
    fleet.run_to(334, alive).await;
    assert_eq!(fleet.tally(), (0, 601));
    assert_eq!(fleet.offline_transitions(), 0);
    // Protection over: the still silent go OFFLINE at once, node 700 among
    // them, no longer suspect.
    fleet.run_to(335, alive).await;
    assert_eq!(fleet.tally(), (601, 0));
    assert_eq!(fleet.node(700).status(), pb::NodeStatus::Offline);
    assert_eq!(fleet.registry.guard_status().active, None);
    assert_eq!(fleet.registry.guard_status().held, 0);
}

#[tokio::test(start_paused = true)]
async fn a_node_still_silent_when_the_others_return_goes_offline_then() {
    let mut fleet = Fleet::start(1000, GuardConfig::default());
    // 600 silent from 5 s; all but node 0 come back at 65 s, which ends the
    // protection early: node 0 goes OFFLINE then, not at 335 s.
    let alive = |i: usize, s: u64| i >= 600 || s <= 5 || (s >= 65 && i != 0);
    fleet.run_to(64, alive).await;
    assert_eq!(fleet.tally(), (0, 600));
    fleet.run_to(66, alive).await;
    assert_eq!(fleet.tally(), (1, 0));
    assert_eq!(fleet.node(0).status(), pb::NodeStatus::Offline);
    assert_eq!(fleet.registry.guard_status().active, None);
    // And it stays so, the rest ONLINE and trusted.
    fleet.run_to(150, alive).await;
    assert_eq!(fleet.tally(), (1, 0));
    assert_eq!(fleet.offline_transitions(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_small_fleet_never_trips_the_guard() {
    let mut fleet = Fleet::start(9, GuardConfig::default());
    fleet.run_to(31, |_, _| false).await;
    assert_eq!(fleet.tally(), (9, 0), "below --mass-offline-min-nodes");
    assert_eq!(
        fleet.registry.guard_stats().trips.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_stall_of_three_timeouts_gives_every_node_a_fresh_grace() {
    let mut fleet = Fleet::start(20, GuardConfig::default());
    fleet.run_to(5, |_, _| true).await;
    // The whole process stops at 5 s for 3 node timeouts: the expiry loop,
    // which asked to wake at 30 s (the registration deadlines), wakes at
    // 95 s, 65 s late.
    tokio::time::advance(3 * TIMEOUT).await;
    advance(Duration::ZERO).await;
    fleet.secs += 90;
    assert_eq!(fleet.tally(), (0, 20), "nobody OFFLINE, everyone suspect");
    let node = fleet.node(3);
    assert_eq!(node.suspect_reason, "registry stalled for 1m 5s");
    assert_eq!(
        fleet.registry.guard_stats().stalls.load(Ordering::Relaxed),
        1
    );
    assert!(
        fleet
            .registry
            .degraded()
            .unwrap()
            .contains("20 nodes suspect")
    );
    // Heartbeats clear the flag; node 0 stays silent and goes OFFLINE one
    // node timeout after the stall ended (95 s + 30 s), not before.
    let alive = |i: usize, _| i != 0;
    fleet.run_to(124, alive).await;
    assert_eq!(fleet.tally(), (0, 1));
    advance(Duration::from_secs(1) - MS).await;
    assert_eq!(fleet.node(0).status(), pb::NodeStatus::Online);
    advance(2 * MS).await;
    assert_eq!(fleet.tally(), (1, 0));
    assert_eq!(fleet.registry.degraded(), None);
}

#[tokio::test(start_paused = true)]
async fn only_a_wake_up_later_than_the_threshold_is_a_stall() {
    let (registry, _stop) = start_with(GuardConfig::off());
    registry.register(registration("n1"), Now::read()).unwrap();
    let threshold = stall_threshold(&registry.timing());
    assert_eq!(threshold, Duration::from_secs(10));
    let asked = Instant::now();
    let at = |late: Duration| Now {
        at: asked + late,
        wall: Utc::now(),
    };
    assert_eq!(registry.woke(None, at(TIMEOUT)), None, "no deadline asked");
    assert_eq!(registry.woke(Some(asked), at(threshold)), None);
    assert!(!registry.get("n1").unwrap().suspect);
    assert_eq!(
        registry.woke(Some(asked), at(threshold + MS)),
        Some(threshold + MS)
    );
    let node = registry.get("n1").unwrap();
    assert!(node.suspect);
    assert_eq!(node.suspect_reason, "registry stalled for 10s 1ms");
}

#[tokio::test(start_paused = true)]
async fn grace_all_skips_offline_nodes_and_a_beat_clears_the_flag() {
    let (registry, _stop) = start_with(GuardConfig::off());
    let reg = registry.register(registration("up"), Now::read()).unwrap();
    registry
        .register(registration("down"), Now::read())
        .unwrap();
    advance(TIMEOUT + MS).await;
    let slot = registry
        .attach("up", reg.session_id, &reg.session_secret)
        .unwrap();
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            beat(pb::PoolState::Ready),
            Instant::now(),
        )
        .unwrap();
    assert_eq!(status(&registry, "down"), pb::NodeStatus::Offline);
    let before = registry.revision();
    assert_eq!(registry.grace_all(Now::read(), "registry restarted"), 1);
    assert_eq!(
        registry.revision(),
        before + 1,
        "one event: the ONLINE node's"
    );
    assert!(!registry.get("down").unwrap().suspect);
    assert_eq!(
        registry.get("up").unwrap().suspect_reason,
        "registry restarted"
    );
    registry
        .heartbeat(
            &slot,
            reg.session_id,
            beat(pb::PoolState::Ready),
            Instant::now(),
        )
        .unwrap();
    let up = registry.get("up").unwrap();
    assert!(!up.suspect && up.suspect_reason.is_empty());
    assert_eq!(
        registry.revision(),
        before + 2,
        "clearing the flag is an event"
    );
    assert_eq!(registry.guard_status().suspect, 0);
}
