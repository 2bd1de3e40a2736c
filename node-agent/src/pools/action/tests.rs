//! The action runner against a local HTTP server on 127.0.0.1:0 and real
//! commands writing temporary files, and the once-per-drain bookkeeping.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use tokio::net::TcpListener;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);

/// An engine admin endpoint: `/ok` answers 204, `/busy` 503, `/slow` never
/// within a test's timeout. Returns the base URL and the POSTs it got.
async fn engine() -> (String, Arc<AtomicUsize>) {
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = |status: StatusCode, posts: &Arc<AtomicUsize>| {
        let posts = Arc::clone(posts);
        move || {
            posts.fetch_add(1, Ordering::SeqCst);
            async move { (status, "engine says so") }
        }
    };
    let router = Router::new()
        .route("/ok", post(counted(StatusCode::NO_CONTENT, &posts)))
        .route(
            "/busy",
            post(counted(StatusCode::SERVICE_UNAVAILABLE, &posts)),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                StatusCode::OK
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, posts)
}

fn sh(script: &str) -> PoolAction {
    PoolAction::Command(vec!["sh".into(), "-c".into(), script.into()])
}

#[tokio::test]
async fn an_http_post_action_succeeds_on_2xx_and_fails_naming_the_status() {
    let (base, posts) = engine().await;
    let ok = PoolAction::HttpPost(format!("{base}/ok"));
    run_action(&ok, ActionKind::Drain, "pool-0", TIMEOUT)
        .await
        .unwrap();
    assert_eq!(posts.load(Ordering::SeqCst), 1);
    let busy = PoolAction::HttpPost(format!("{base}/busy"));
    let err = run_action(&busy, ActionKind::Drain, "pool-0", TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ActionError::Status { status, body }
            if *status == StatusCode::SERVICE_UNAVAILABLE && body == "engine says so"),
        "{err:?}"
    );
    let slow = PoolAction::HttpPost(format!("{base}/slow"));
    let err = run_action(
        &slow,
        ActionKind::Drain,
        "pool-0",
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert_eq!(err, ActionError::Timeout("200ms".into()));
}

#[tokio::test]
async fn an_http_post_to_nothing_fails() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/drain", listener.local_addr().unwrap());
    drop(listener);
    let err = run_action(&PoolAction::HttpPost(url), ActionKind::Drain, "p", TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, ActionError::Failed(_)), "{err:?}");
}

#[tokio::test]
async fn a_command_action_runs_with_the_pool_in_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out");
    let script = format!(
        "echo \"$NODE_AGENT_ACTION $NODE_AGENT_POOL_ID\" > '{}'",
        file.display()
    );
    run_action(&sh(&script), ActionKind::Resume, "pool-7", TIMEOUT)
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "resume pool-7\n");

    let err = run_action(
        &sh("echo no engine here >&2; exit 3"),
        ActionKind::Drain,
        "p",
        TIMEOUT,
    )
    .await
    .unwrap_err();
    match err {
        ActionError::Exit { status, stderr } => {
            assert!(status.contains('3'), "{status}");
            assert_eq!(stderr, "no engine here");
        }
        other => panic!("{other:?}"),
    }
    let missing = PoolAction::Command(vec!["/nonexistent/drain-engine".into()]);
    let err = run_action(&missing, ActionKind::Drain, "p", TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ActionError::Failed(why) if why.contains("/nonexistent/drain-engine")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_command_past_its_timeout_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("late");
    let script = format!("sleep 1; touch '{}'", file.display());
    let err = run_action(
        &sh(&script),
        ActionKind::Drain,
        "p",
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ActionError::Timeout(_)), "{err:?}");
    // Killed, not left running: the file never appears.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!file.exists());
}

#[tokio::test]
async fn the_same_drain_twice_runs_the_action_once() {
    let (base, posts) = engine().await;
    let actions = Actions::new(TIMEOUT);
    let action = PoolAction::HttpPost(format!("{base}/ok"));
    let first = actions.drain("pool-0", &action).expect("started");
    // Re-sent while the first still runs, and again after it is done.
    assert!(actions.drain("pool-0", &action).is_none());
    first.await.unwrap();
    assert_eq!(actions.drain_state("pool-0"), Some(DrainAction::Done));
    assert!(actions.drain("pool-0", &action).is_none());
    assert_eq!(posts.load(Ordering::SeqCst), 1);
    // Resumed, then drained again: the action runs again.
    assert!(actions.resume("pool-0", None).is_none());
    assert_eq!(actions.drain_state("pool-0"), None);
    actions.drain("pool-0", &action).unwrap().await.unwrap();
    assert_eq!(posts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failed_drain_action_is_retried_on_the_next_command() {
    let (base, posts) = engine().await;
    let actions = Actions::new(TIMEOUT);
    let busy = PoolAction::HttpPost(format!("{base}/busy"));
    actions.drain("pool-0", &busy).unwrap().await.unwrap();
    assert_eq!(actions.drain_state("pool-0"), Some(DrainAction::Failed));
    actions.drain("pool-0", &busy).unwrap().await.unwrap();
    assert_eq!(posts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_resume_waits_for_the_pools_drain_action() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let drain = sh(&format!("sleep 0.3; echo drain >> '{}'", log.display()));
    let resume = sh(&format!("echo resume >> '{}'", log.display()));
    let actions = Actions::new(TIMEOUT);
    let drained = actions.drain("pool-0", &drain).unwrap();
    let resumed = actions.resume("pool-0", Some(&resume)).unwrap();
    drained.await.unwrap();
    resumed.await.unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "drain\nresume\n");
    // The resume came while the drain ran: the drain's outcome is not
    // recorded over it, so the next drain runs the action again.
    assert_eq!(actions.drain_state("pool-0"), None);
}

#[test]
fn actions_are_checked() {
    assert!(
        PoolAction::HttpPost("http://127.0.0.1:8000/admin/drain".into())
            .check()
            .is_ok()
    );
    assert!(sh("true").check().is_ok());
    for (action, words) in [
        (
            PoolAction::HttpPost("https://127.0.0.1/drain".into()),
            "plain http://",
        ),
        (PoolAction::HttpPost("not a url".into()), "not a URL"),
        (PoolAction::HttpPost("/drain".into()), "plain http://"),
        (PoolAction::Command(vec![]), "empty"),
        (PoolAction::Command(vec![" ".into()]), "empty"),
        (PoolAction::Command(vec!["a\0b".into()]), "NUL"),
        (PoolAction::Command(vec!["x".into(); 65]), "at most 64"),
    ] {
        let why = action.check().unwrap_err();
        assert!(why.contains(words), "{action:?}: {why}");
    }
}

#[test]
fn long_output_keeps_its_end_on_one_line() {
    let text = format!("{}\nthe error", "x".repeat(500));
    let short = shorten(&text);
    assert!(
        short.starts_with("...") && short.ends_with("x the error"),
        "{short}"
    );
    assert_eq!(short.chars().count(), LOGGED_CHARS + 3);
    assert_eq!(shorten("a\nb"), "a b");
}
