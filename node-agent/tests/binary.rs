//! The `node-agent` binary as the end-to-end suite runs it: flags, exit
//! codes and SIGTERM handling.

mod common;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{Registry, eventually, get_node};
use registry_proto::pb;

const WAIT: Duration = Duration::from_secs(10);

fn agent_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_node-agent"));
    // A developer's or CI's own NODE_AGENT_* must not leak into the test.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NODE_AGENT_") {
            command.env_remove(key);
        }
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

async fn wait_exit(child: &mut Child) -> ExitStatus {
    eventually("the agent to exit", WAIT, || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await
}

fn stderr_of(child: Child) -> String {
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn binary_registers_and_deregisters_on_sigterm() {
    let registry = Registry::start().await;
    let mut child = agent_command()
        .args([
            "--registry",
            &registry.url(),
            "--node-id",
            "bin-1",
            "--fake-gpus",
            "2",
            "--pool",
            "pool-0",
            "--heartbeat-interval",
            "300ms",
            "--log-format",
            "json",
        ])
        .env("NODE_AGENT_LABEL", "zone=eu-1,rack=r7")
        .spawn()
        .unwrap();
    let mut client = registry.client().await;
    let node = eventually("bin-1 online with pool status", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "bin-1").await.filter(|n| {
                n.status() == pb::NodeStatus::Online
                    && n.pool_status.iter().any(|p| p.pool_id == "pool-0")
            })
        }
    })
    .await;
    assert_eq!(node.capabilities.unwrap().gpus.len(), 2);
    assert_eq!(node.labels["rack"], "r7");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(0), "{}", stderr_of(child));
    assert!(get_node(&mut client, "bin-1").await.is_none());
    registry.stop().await;
}

#[tokio::test]
async fn binary_refuses_bad_flags_with_status_2() {
    let mut child = agent_command()
        .args(["--node-id", "Not_A_Label"])
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(2));
    let stderr = stderr_of(child);
    assert!(stderr.contains("invalid node id"), "{stderr}");
}

#[tokio::test]
async fn binary_requiring_gpus_fails_clearly_without_them() {
    let mut child = agent_command()
        .args(["--node-id", "n1", "--require-gpus", "--fake-gpus", "0"])
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(1));
    let stderr = stderr_of(child);
    assert!(stderr.contains("no GPU was found"), "{stderr}");

    // Without an NVIDIA driver (CI), NVML itself is what is missing.
    if node_agent::NvmlGpuSource::init().is_err() {
        let mut child = agent_command()
            .args(["--node-id", "n1", "--require-gpus"])
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child).await;
        assert_eq!(status.code(), Some(1));
        let stderr = stderr_of(child);
        assert!(stderr.contains("NVML unavailable"), "{stderr}");
    }
}
