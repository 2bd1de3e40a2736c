//! Unit tests of the configuration: flags, file and their merge. Token and
//! TLS settings are in [`security`].

mod security;

use std::path::Path;

use clap::{CommandFactory, Parser};

use super::*;
use crate::auth::Secret;
use crate::pools::ConfiguredState;
use crate::pools::action::PoolAction;
use registry_proto::pb;
use registry_proto::rules::MAX_MODELS_AVAILABLE;

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("node-agent").chain(args.iter().copied())).unwrap()
}

#[test]
fn flags_resolve_with_defaults() {
    let config = AgentConfig::resolve(
        cli(&[
            "--node-id",
            "n1",
            "--fake-gpus",
            "2",
            "--pool",
            "pool-0",
            "--heartbeat-interval",
            "300ms",
        ]),
        FileConfig::default(),
    )
    .unwrap();
    assert_eq!(config.registry, DEFAULT_REGISTRY);
    assert_eq!(config.node_id, "n1");
    assert_eq!(config.gpus.fake, Some(2));
    assert_eq!(config.pools, vec![PoolConfig::new("pool-0")]);
    assert_eq!(config.heartbeat_interval, Some(Duration::from_millis(300)));
    assert_eq!(config.backoff.max, Duration::from_secs(30));
    assert!(
        rules::address(Field::Name("address"), &config.address).is_ok(),
        "{}",
        config.address
    );
    assert!(!config.machine_id.is_empty());
}

#[test]
fn file_values_apply_and_flags_override_them() {
    let file = FileConfig::parse(
        r#"
        registry = "http://registry.internal:50051"
        node_id = "from-file"
        address = "http://10.0.0.5:9200"
        heartbeat_interval = "5s"
        backoff_max = "1m"
        handoff_dir = "/run/engines"
        require_gpus = true
        log_format = "json"

        [labels]
        zone = "eu-1"
        rack = "r7"

        [[pools]]
        id = "pool-0"
        engine = "llamacpp"
        slots = 4
        gpus = [0, 1]
        probe = "http://127.0.0.1:8081/health"

        [[pools]]
        pool_id = "pool-1"
        state = "initializing"
        "#,
        Path::new("test.toml"),
    )
    .unwrap();
    let config = AgentConfig::resolve(
        cli(&[
            "--node-id",
            "from-flag",
            "--label",
            "zone=eu-2",
            "--pool",
            "pool-1,slots=2",
        ]),
        file,
    )
    .unwrap();
    assert_eq!(config.registry, "http://registry.internal:50051");
    assert_eq!(config.node_id, "from-flag");
    assert_eq!(config.address, "http://10.0.0.5:9200");
    assert_eq!(config.heartbeat_interval, Some(Duration::from_secs(5)));
    assert_eq!(config.backoff.max, Duration::from_secs(60));
    assert_eq!(
        config.handoff_dir.as_deref(),
        Some(Path::new("/run/engines"))
    );
    assert!(config.gpus.require);
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.labels["zone"], "eu-2");
    assert_eq!(config.labels["rack"], "r7");
    assert_eq!(config.pools.len(), 2);
    assert_eq!(config.pools[0].gpus, Some(vec![0, 1]));
    assert_eq!(config.pools[0].slots, Some(4));
    // The flag replaced the file's pool-1 entirely.
    assert_eq!(config.pools[1].slots, Some(2));
    assert_eq!(config.pools[1].state, None);
}

#[test]
fn example_config_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/node-agent.example.toml");
    let file = FileConfig::load(&path).unwrap();
    let flags = Cli {
        settings: Settings {
            node_id: Some("n1".into()),
            ..Settings::default()
        },
        ..Cli::default()
    };
    let config = AgentConfig::resolve(flags, file).unwrap();
    assert_eq!(config.registry, "http://registry.internal:50051");
    assert_eq!(config.pools.len(), 2);
    assert_eq!(config.pools[1].state, Some(ConfiguredState::Initializing));
    assert_eq!(config.labels.len(), 2);
    assert!(config.gpus.require);
    assert_eq!(config.models_available, ["llama-3.1-70b-instruct"]);
    assert_eq!(
        config.pools[0].endpoint.as_deref(),
        Some("http://10.0.0.5:8081")
    );
    assert_eq!(
        config.pools[0].spec().metrics_url,
        "http://127.0.0.1:8081/metrics"
    );
    assert_eq!(
        config.pools[0].drain,
        Some(PoolAction::HttpPost(
            "http://127.0.0.1:8081/admin/drain".into()
        ))
    );
    assert_eq!(
        config.pools[0].resume,
        Some(PoolAction::Command(vec![
            "systemctl".into(),
            "reload".into(),
            "llama-server@pool-0".into()
        ]))
    );
    assert_eq!(config.pools[1].drain, None);
}

#[test]
fn pool_actions_and_their_timeout_come_from_the_file() {
    let file = FileConfig::parse(
        r#"
action_timeout = "5s"
[[pools]]
id = "p0"
drain = { command = ["sh", "-c", "echo x > drained.txt"] }
[[pools]]
id = "p1"
resume = { http_post = "http://127.0.0.1:8000/admin/resume" }
"#,
        Path::new("t.toml"),
    )
    .unwrap();
    let config = AgentConfig::resolve(cli(&["--node-id", "n1"]), file).unwrap();
    assert_eq!(config.action_timeout, Duration::from_secs(5));
    assert_eq!(
        config.pools[0].drain,
        Some(PoolAction::Command(vec![
            "sh".into(),
            "-c".into(),
            "echo x > drained.txt".into()
        ]))
    );
    assert_eq!(config.pools[0].resume, None);
    assert_eq!(
        config.pools[1].resume,
        Some(PoolAction::HttpPost(
            "http://127.0.0.1:8000/admin/resume".into()
        ))
    );
    let config = AgentConfig::resolve(cli(&["--node-id", "n1"]), FileConfig::default()).unwrap();
    assert_eq!(config.action_timeout, crate::config::DEFAULT_ACTION_TIMEOUT);
    let zero = cli(&["--node-id", "n1", "--action-timeout", "0s"]);
    let err = AgentConfig::resolve(zero, FileConfig::default()).unwrap_err();
    assert!(err.to_string().contains("action timeout"), "{err}");
}

#[test]
fn unusable_pool_actions_stop_the_agent_naming_the_pool_and_key() {
    for (action, words) in [
        (
            r#"drain = { http_post = "https://127.0.0.1/drain" }"#,
            "drain: http_post",
        ),
        (r#"resume = { command = [] }"#, "resume: command is empty"),
    ] {
        let text = format!("[[pools]]\nid = \"p0\"\n{action}\n");
        let file = FileConfig::parse(&text, Path::new("t.toml")).unwrap();
        let err = AgentConfig::resolve(cli(&["--node-id", "n1"]), file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid pool \"p0\" (--pool, NODE_AGENT_POOL, [[pools]])")
                && err.contains(words),
            "{err}"
        );
    }
    // Malformed shapes are refused by the parser, naming the key.
    for action in [
        r#"drain = { http_get = "http://127.0.0.1/drain" }"#,
        r#"drain = "http://127.0.0.1/drain""#,
        r#"drain = { http_post = "http://x", command = ["y"] }"#,
    ] {
        let text = format!("[[pools]]\nid = \"p0\"\n{action}\n");
        let err = FileConfig::parse(&text, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("drain"), "{action}: {err}");
    }
}

#[test]
fn example_metrics_settings_are_valid_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/node-agent.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: String = text
        .lines()
        .map(|line| {
            let key = line.strip_prefix("# ").unwrap_or(line);
            if key.starts_with("metrics_") {
                key
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let file = FileConfig::parse(&text, &path).unwrap();
    let flags = Cli {
        settings: Settings {
            node_id: Some("n1".into()),
            ..Settings::default()
        },
        ..Cli::default()
    };
    let config = AgentConfig::resolve(flags, file).unwrap();
    assert_eq!(config.metrics_listen, Some("0.0.0.0:9101".parse().unwrap()));
    assert_eq!(
        config.advertised_metrics_url(Some(9101)),
        "http://10.0.0.5:9101/metrics"
    );
}

#[test]
fn example_security_settings_are_valid_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/node-agent.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: String = text
        .lines()
        .map(|line| {
            let key = line.strip_prefix("# ").unwrap_or(line);
            if key.starts_with("auth_token_file =") || key.starts_with("tls_") {
                key.to_owned()
            } else {
                line.replace("http://registry.internal", "https://registry.internal")
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let file = FileConfig::parse(&text, &path).unwrap();
    let flags = Cli {
        settings: Settings {
            node_id: Some("n1".into()),
            ..Settings::default()
        },
        ..Cli::default()
    };
    let config = AgentConfig::resolve(flags, file).unwrap();
    assert_eq!(config.registry, "https://registry.internal:50051");
    assert_eq!(
        config.auth_token,
        Some(TokenSource::File("/etc/node-agent/token".into()))
    );
    assert_eq!(config.tls.domain.as_deref(), Some("registry.internal"));
    assert!(config.tls.ca.is_some() && config.tls.cert.is_some() && config.tls.key.is_some());
}

#[test]
fn file_pool_state_parses() {
    let file = FileConfig::parse(
        "[[pools]]\nid = \"p\"\nstate = \"draining\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(file.pools[0].state, Some(ConfiguredState::Draining));
}

#[test]
fn bad_files_are_refused_with_the_reason() {
    for text in [
        "registy = \"typo\"",
        "heartbeat_interval = \"soon\"",
        "heartbeat_interval = 10",
        "[[pools]]\nid = \"p\"\ncolour = \"red\"",
        "not toml at all",
    ] {
        let err = FileConfig::parse(text, Path::new("bad.toml")).unwrap_err();
        assert!(err.to_string().contains("bad.toml"), "{err}");
    }
}

#[test]
fn invalid_values_are_refused() {
    let bad_cases: &[&[&str]] = &[
        &["--node-id", "Bad_Node"],
        &["--node-id=-n1"],
        &["--node-id", "n1", "--registry", "https://r:1"],
        &["--node-id", "n1", "--registry", "nonsense"],
        &["--node-id", "n1", "--address", "10.0.0.5:9200"],
        &["--node-id", "n1", "--address", "ftp://x"],
        &["--node-id", "n1", "--label", "novalue"],
        &["--node-id", "n1", "--label", "bad key=v"],
        &["--node-id", "n1", "--pool", "p", "--pool", "p,slots=2"],
        &["--node-id", "n1", "--pool", "bad/pool"],
        &["--node-id", "n1", "--heartbeat-interval", "0s"],
        &["--node-id", "n1", "--fake-gpus", "65"],
        &[
            "--node-id",
            "n1",
            "--backoff-initial",
            "1m",
            "--backoff-max",
            "1s",
        ],
        &["--node-id", "n1", "--machine-id", ""],
        &[
            "--node-id",
            "n1",
            "--registry",
            "http://r:1",
            "--tls-ca",
            "/ca.pem",
        ],
        &[
            "--node-id",
            "n1",
            "--registry",
            "https://r:1",
            "--tls-ca",
            "/ca.pem",
            "--tls-cert",
            "/node.pem",
        ],
        &[
            "--node-id",
            "n1",
            "--registry",
            "https://r:1",
            "--tls-ca",
            "/ca.pem",
            "--tls-domain",
            "not a name",
        ],
    ];
    for args in bad_cases {
        assert!(
            AgentConfig::resolve(cli(args), FileConfig::default()).is_err(),
            "{args:?} was accepted"
        );
    }
    assert!(Cli::try_parse_from(["node-agent", "--heartbeat-interval", "soon"]).is_err());
    assert!(Cli::try_parse_from(["node-agent", "--log-format", "xml"]).is_err());
}

#[test]
fn labels_and_pools_split_on_their_delimiters() {
    let c = cli(&["--label", "a=1,b=2", "--pool", "p1;p2,slots=3"]);
    assert_eq!(c.labels, ["a=1", "b=2"]);
    assert_eq!(c.pools, ["p1", "p2,slots=3"]);
}

#[test]
fn every_flag_reads_a_node_agent_environment_variable() {
    let command = Cli::command();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{id} has no env var"));
        let long = arg.get_long().unwrap();
        let want = format!("NODE_AGENT_{}", long.to_uppercase().replace('-', "_"));
        assert_eq!(env.to_str(), Some(want.as_str()), "--{long}");
    }
}

#[test]
fn values_the_registry_refuses_stop_the_agent_naming_the_setting() {
    for (args, setting) in [
        (
            &["--node-id", "n1", "--machine-id", "has space"][..],
            "--machine-id",
        ),
        (&["--node-id", "n1", "--label", "zone=a\tb"][..], "--label"),
        (
            &["--node-id", "n1", "--address", "http://"][..],
            "--address",
        ),
        (&["--node-id", "Bad_Node"][..], "--node-id"),
    ] {
        let err = AgentConfig::resolve(cli(args), FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(setting), "{args:?}: {err}");
    }
    let long_model = format!("--pool=p,model={}", "m".repeat(257));
    let err = AgentConfig::resolve(
        cli(&["--node-id", "n1", &long_model]),
        FileConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model") && err.contains("257 bytes"), "{err}");
    let many = (0..=MAX_GPUS)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(":");
    let many_gpus = format!("--pool=p,gpus={many}");
    let err = AgentConfig::resolve(cli(&["--node-id", "n1", &many_gpus]), FileConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("gpu_indices"), "{err}");
    let pools = (0..=MAX_POOLS)
        .map(|i| format!("[[pools]]\nid = \"p{i}\"\n"))
        .collect::<String>();
    let file = FileConfig::parse(&pools, Path::new("t.toml")).unwrap();
    let err = AgentConfig::resolve(cli(&["--node-id", "n1"]), file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[[pools]]") && err.contains("65 entries"),
        "{err}"
    );
}

#[test]
fn register_refused_retry_defaults_to_five_minutes_and_is_a_setting() {
    let config = AgentConfig::resolve(cli(&["--node-id", "n1"]), FileConfig::default()).unwrap();
    assert_eq!(config.register_refused_retry, Duration::from_secs(300));
    let file = FileConfig::parse("register_refused_retry = \"10m\"\n", Path::new("t")).unwrap();
    let config = AgentConfig::resolve(cli(&["--node-id", "n1"]), file.clone()).unwrap();
    assert_eq!(config.register_refused_retry, Duration::from_secs(600));
    let flag = cli(&["--node-id", "n1", "--register-refused-retry", "90s"]);
    let config = AgentConfig::resolve(flag, file).unwrap();
    assert_eq!(config.register_refused_retry, Duration::from_secs(90));
    let zero = cli(&["--node-id", "n1", "--register-refused-retry", "0s"]);
    assert!(AgentConfig::resolve(zero, FileConfig::default()).is_err());
}

#[test]
fn require_gpus_is_a_flag_that_also_takes_a_value() {
    let on = cli(&["--require-gpus", "--node-id", "n1"]);
    assert_eq!(on.settings.require_gpus, Some(true));
    assert_eq!(on.settings.node_id.as_deref(), Some("n1"));
    assert_eq!(cli(&[]).settings.require_gpus, None);
    let file = FileConfig::parse("require_gpus = true\n", Path::new("t")).unwrap();
    let off = cli(&["--node-id", "n1", "--require-gpus=false"]);
    assert!(
        !AgentConfig::resolve(off, file.clone())
            .unwrap()
            .gpus
            .require
    );
    let unset = cli(&["--node-id", "n1"]);
    assert!(AgentConfig::resolve(unset, file).unwrap().gpus.require);
}

#[test]
fn fake_gpu_faults_mig_and_the_xid_window_come_from_flags_and_file() {
    use crate::gpu::faults::Fault;
    let file = FileConfig::parse(
        "fake_gpus = 2\nfake_gpu_faults = \"0:thermal@10s\"\nxid_window = \"2m\"\n",
        Path::new("t"),
    )
    .unwrap();
    let config = AgentConfig::resolve(
        cli(&["--node-id", "n1", "--fake-mig", "3g.40gb, 3g.40gb"]),
        file.clone(),
    )
    .unwrap();
    assert_eq!(config.gpus.fake_faults.len(), 1);
    assert_eq!(config.gpus.fake_faults[0].fault, Fault::Thermal);
    assert_eq!(config.gpus.fake_faults[0].from, Duration::from_secs(10));
    assert_eq!(config.gpus.fake_mig, ["3g.40gb", "3g.40gb"]);
    assert_eq!(config.gpus.xid_window, Duration::from_secs(120));
    // The flag beats the file; a bad schedule is refused naming the setting.
    let flag = cli(&["--node-id", "n1", "--fake-gpu-faults", "1:xid79@1s-2s"]);
    let config = AgentConfig::resolve(flag, file.clone()).unwrap();
    assert_eq!(config.gpus.fake_faults[0].fault, Fault::Xid(79));
    let bad = cli(&["--node-id", "n1", "--fake-gpu-faults", "1:melted"]);
    let err = AgentConfig::resolve(bad, file).unwrap_err().to_string();
    assert!(
        err.contains("--fake-gpu-faults") && err.contains("melted"),
        "{err}"
    );
    let defaults = AgentConfig::resolve(cli(&["--node-id", "n1"]), FileConfig::default()).unwrap();
    assert_eq!(defaults.gpus.xid_window, crate::gpu::DEFAULT_XID_WINDOW);
    assert!(defaults.gpus.fake_mig.is_empty());
}

#[test]
fn pool_endpoints_and_staged_models_come_from_flags_and_file() {
    let file = FileConfig::parse(
        r#"
        models_available = ["llama-3.1-70b", "qwen2.5-7b"]

        [[pools]]
        id = "pool-1"
        endpoint = "https://pool-1.gpu-01.example/v1"
        "#,
        Path::new("t.toml"),
    )
    .unwrap();
    let config = AgentConfig::resolve(
        cli(&[
            "--node-id",
            "n1",
            "--pool",
            "pool-0,model=m,endpoint=http://127.0.0.1:8081",
            "--model-available",
            "mistral-7b,qwen2.5-7b",
        ]),
        file,
    )
    .unwrap();
    let endpoints: Vec<String> = config.pools.iter().map(|p| p.spec().endpoint).collect();
    assert!(
        endpoints.contains(&"http://127.0.0.1:8081".to_owned()),
        "{endpoints:?}"
    );
    assert!(endpoints.contains(&"https://pool-1.gpu-01.example/v1".to_owned()));
    assert_eq!(
        config.models_available,
        ["llama-3.1-70b", "qwen2.5-7b", "mistral-7b"],
        "the flags add to the file's list, each model once"
    );
    let request =
        crate::registration::register_request(&config, &config.pools, pb::Capabilities::default());
    assert_eq!(request.models_available, config.models_available);
}

#[test]
fn bad_endpoints_and_staged_models_stop_the_agent_naming_the_setting() {
    let err = AgentConfig::resolve(
        cli(&["--node-id", "n1", "--pool", "p,endpoint=10.0.0.5:8000"]),
        FileConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("endpoint") && err.contains("\"p\""), "{err}");
    let err = AgentConfig::resolve(
        cli(&["--node-id", "n1", "--model-available", "bad\tname"]),
        FileConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--model-available") && err.contains("models_available[0]"),
        "{err}"
    );
    let many = (0..=MAX_MODELS_AVAILABLE)
        .map(|i| format!("\"m{i}\""))
        .collect::<Vec<_>>()
        .join(",");
    let file = FileConfig::parse(&format!("models_available = [{many}]"), Path::new("t")).unwrap();
    let err = AgentConfig::resolve(cli(&["--node-id", "n1"]), file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("models_available") && err.contains("257 entries"),
        "{err}"
    );
}

#[test]
fn metrics_settings_come_from_flags_and_file() {
    let config = AgentConfig::resolve(
        cli(&[
            "--node-id",
            "n1",
            "--address",
            "http://10.0.0.5:9200",
            "--metrics-listen",
            "0.0.0.0:9101",
            "--pool",
            "pool-0,metrics_url=http://127.0.0.1:8081/metrics",
        ]),
        FileConfig::default(),
    )
    .unwrap();
    assert_eq!(config.metrics_listen, Some("0.0.0.0:9101".parse().unwrap()));
    assert_eq!(config.metrics_address, None);
    // Derived from the host of --address and the metrics port.
    assert_eq!(
        config.advertised_metrics_url(Some(9101)),
        "http://10.0.0.5:9101/metrics"
    );
    assert_eq!(config.advertised_metrics_url(None), "");
    assert_eq!(
        config.pools[0].spec().metrics_url,
        "http://127.0.0.1:8081/metrics"
    );

    let file = FileConfig::parse(
        r#"
        node_id = "n2"
        metrics_listen = "127.0.0.1:9102"
        metrics_address = "https://gpu-2.example:443/agent/metrics"

        [[pools]]
        id = "pool-0"
        metrics_url = "http://127.0.0.1:8082/metrics"
        "#,
        Path::new("agent.toml"),
    )
    .unwrap();
    let config = AgentConfig::resolve(cli(&[]), file).unwrap();
    assert_eq!(
        config.metrics_listen,
        Some("127.0.0.1:9102".parse().unwrap())
    );
    // Given explicitly: advertised as is.
    assert_eq!(
        config.advertised_metrics_url(Some(9102)),
        "https://gpu-2.example:443/agent/metrics"
    );
    assert_eq!(
        config.pools[0].spec().metrics_url,
        "http://127.0.0.1:8082/metrics"
    );
}

#[test]
fn bad_metrics_urls_are_refused_naming_the_setting() {
    let err = AgentConfig::resolve(
        cli(&["--node-id", "n1", "--metrics-address", "ftp://h/metrics"]),
        FileConfig::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("--metrics-address"), "{text}");
    assert!(text.contains("metrics_address"), "{text}");

    let err = AgentConfig::resolve(
        cli(&["--node-id", "n1", "--pool", "pool-0,metrics_url=not a url"]),
        FileConfig::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("metrics_url"), "{text}");

    assert!(Cli::try_parse_from(["node-agent", "--metrics-listen", "nowhere"]).is_err());
}
