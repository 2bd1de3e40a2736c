//! The `node-agent` binary as the end-to-end suite runs it: flags, exit
//! codes and SIGTERM handling.

mod common;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{
    ADMIN_TOKEN, Admin, ClientTls, Files, NODE_TOKEN, NodeCondition, get_node, registry_settings,
};
use registry_proto::pb;
use test_support::{TestRegistry, eventually};

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
        async move { status.ok_or_else(|| "still running".to_owned()) }
    })
    .await
}

fn stderr_of(child: Child) -> String {
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn binary_registers_and_deregisters_on_sigterm() {
    let registry = TestRegistry::start(registry_settings()).await;
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
            get_node(&mut client, "bin-1").await.matching(|n| {
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

#[tokio::test]
async fn binary_sends_the_token_from_the_environment_and_never_shows_it() {
    let files = Files::new();
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(files.registry_tokens()),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(&registry, &ClientTls::default()).await;
    let mut child = agent_command()
        .args([
            "--registry",
            &registry.url(),
            "--node-id",
            "bin-t",
            "--fake-gpus",
            "1",
            "--pool",
            "pool-0",
            "--heartbeat-interval",
            "300ms",
        ])
        .env("NODE_AGENT_AUTH_TOKEN", NODE_TOKEN)
        .spawn()
        .unwrap();
    admin.wait_heartbeating("bin-t").await;

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut child).await;
    let stderr = stderr_of(child);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(admin.node("bin-t").await.is_none(), "deregistered");
    assert!(stderr.contains("sending a bearer token"), "{stderr}");
    assert!(
        !stderr.contains(NODE_TOKEN),
        "the token was logged:\n{stderr}"
    );

    // --help names the variable but not its value.
    let help = agent_command()
        .arg("--help")
        .env("NODE_AGENT_AUTH_TOKEN", NODE_TOKEN)
        .env("NODE_AGENT_AUTH_TOKEN_FILE", "/etc/node-agent/token")
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("NODE_AGENT_AUTH_TOKEN"), "{help}");
    assert!(help.contains("/etc/node-agent/token"), "{help}");
    assert!(!help.contains(NODE_TOKEN), "{help}");
    assert!(!help.contains(ADMIN_TOKEN), "{help}");
    registry.stop().await;
}

#[tokio::test]
async fn binary_refuses_unusable_token_and_tls_settings_with_status_2() {
    let files = Files::new();
    let token_file = files.write_secret("token", NODE_TOKEN);
    let token_file = token_file.to_str().unwrap();
    let missing = files.path("missing-token");
    let cases: [(&[&str], Option<&str>, &str); 4] = [
        (
            &["--auth-token-file", token_file],
            Some(NODE_TOKEN),
            "give only one",
        ),
        (
            &["--auth-token-file", missing.to_str().unwrap()],
            None,
            "cannot read auth token file",
        ),
        (&[], Some("short"), "invalid auth token"),
        (
            &["--registry", "https://127.0.0.1:1"],
            None,
            "needs --tls-ca",
        ),
    ];
    for (args, env_token, want) in cases {
        let mut command = agent_command();
        command
            .args(["--node-id", "n1", "--fake-gpus", "0"])
            .args(args);
        if let Some(token) = env_token {
            command.env("NODE_AGENT_AUTH_TOKEN", token);
        }
        let mut child = command.spawn().unwrap();
        let status = wait_exit(&mut child).await;
        let stderr = stderr_of(child);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains(NODE_TOKEN), "{stderr}");
    }
}
