//! The registry-server binary's start-up: every setting is checked before
//! anything is bound, and a configuration that cannot work exits 2 with a
//! message naming the flag to change.

use std::process::{Command, Output};

fn registry_server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_registry-server"))
        .args(args)
        // Only the flags count, whatever the caller's environment says.
        .env_clear()
        .output()
        .expect("registry-server runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_interval_not_below_the_timeout_exits_2_naming_the_flag() {
    let out = registry_server(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--node-timeout",
        "5s",
        "--heartbeat-interval",
        "6s",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--heartbeat-interval"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_open_registry_on_a_public_address_exits_2_before_binding() {
    let out = registry_server(&["--listen", "0.0.0.0:0", "--metrics-listen", "off"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--insecure-no-auth"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_taken_metrics_port_exits_2_naming_metrics_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = registry_server(&[
        "--listen",
        "127.0.0.1:0",
        "--node-timeout",
        "5s",
        "--metrics-listen",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--metrics-listen"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unparsable_value_is_a_usage_error() {
    let out = registry_server(&["--node-timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--node-timeout"), "{}", stderr(&out));
}

#[test]
fn a_corrupt_store_file_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.redb");
    std::fs::write(&file, vec![0x5a; 16 * 1024]).unwrap();
    let data_dir = dir.path().display().to_string();
    let out = registry_server(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--store",
        "embedded",
        "--data-dir",
        &data_dir,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&file.display().to_string()),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--reset-store"), "{}", stderr(&out));
    // Never silently replaced by an empty store.
    assert_eq!(std::fs::read(&file).unwrap(), vec![0x5a; 16 * 1024]);
}
