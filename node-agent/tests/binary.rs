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

/// A plain HTTP/1.0 GET of `path` on 127.0.0.1:`port`: the body of a 200.
async fn http_get(port: u16, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    match raw.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.to_owned())
        }
        _ => Err(raw),
    }
}

/// The value of one sample line (`name{labels} value`) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
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
            // GPU 1 falls off the bus from the start: the flag reaches the
            // registry through the binary's real configuration path.
            "--fake-gpu-faults",
            "1:xid79",
            "--fake-mig",
            "3g.40gb,3g.40gb",
            "--pool",
            "pool-0",
            "--heartbeat-interval",
            "300ms",
            "--log-format",
            "json",
            "--address",
            "http://127.0.0.1:9200",
            "--metrics-listen",
            "127.0.0.1:0",
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
    let gpus = &node.capabilities.as_ref().unwrap().gpus;
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[0].mig_instances.len(), 2);
    assert_eq!(gpus[0].mig_instances[0].profile, "3g.40gb");
    assert_eq!(node.labels["rack"], "r7");
    let node = eventually("bin-1 gpu 1 unhealthy", WAIT, || {
        let mut client = client.clone();
        async move {
            get_node(&mut client, "bin-1").await.matching(|n| {
                n.gpu_stats.len() == 2
                    && n.gpu_stats[1].health() == pb::GpuHealth::Unhealthy
                    && n.gpu_stats[0].health() == pb::GpuHealth::Healthy
            })
        }
    })
    .await;
    assert_eq!(
        node.gpu_stats[1].health_reasons,
        ["xid 79 (GPU has fallen off the bus)"]
    );

    // The metrics URL advertised: the host of --address, the port bound.
    let port: u16 = node
        .metrics_address
        .strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("advertised {:?}", node.metrics_address));
    // Served, with the figures of a heartbeat that was acked.
    let text = eventually("an ack in /metrics", WAIT, || async move {
        let text = http_get(port, "/metrics").await?;
        if sample(&text, "node_agent_heartbeat_acks_total").unwrap_or(0.0) >= 1.0 {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    assert_eq!(sample(&text, "node_agent_registered"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "node_agent_registrations_total{outcome=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "node_agent_pools{state=\"ready\"}"),
        Some(1.0)
    );
    assert!(sample(&text, "node_agent_heartbeat_ack_seconds_count").unwrap() >= 1.0);
    assert!(sample(&text, "node_agent_gpu_memory_used_bytes{gpu=\"1\"}").is_some());
    assert!(sample(&text, "node_agent_gpu_utilization_percent{gpu=\"0\"}").is_some());
    assert_eq!(sample(&text, "node_agent_gpu_health{gpu=\"1\"}"), Some(3.0));
    assert_eq!(sample(&text, "node_agent_gpu_health{gpu=\"0\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "node_agent_gpu_xid_errors{gpu=\"1\"}"),
        Some(1.0)
    );

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut child).await;
    let stderr = stderr_of(child);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(get_node(&mut client, "bin-1").await.is_none());
    // JSON logs carry 64-bit ids as strings, which jq and JavaScript read
    // without rounding.
    let registered: serde_json::Value = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "registered")
        .unwrap_or_else(|| panic!("no JSON `registered` line in {stderr}"));
    let session_id = registered["session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("session_id is not a string: {registered}"));
    assert!(session_id.parse::<u64>().is_ok(), "{session_id}");
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
