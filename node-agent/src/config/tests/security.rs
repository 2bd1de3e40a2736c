//! Token and TLS settings: where they come from, what is refused, and that
//! the token is never shown.

use super::*;

const TOKEN: &str = "node-token-aaaaaaaaaaaaaaaa";

#[test]
fn token_file_and_tls_come_from_the_file_and_flags_override_them() {
    let file = FileConfig::parse(
        r#"
        registry = "https://registry.internal:50051"
        auth_token_file = "/etc/node-agent/token"
        tls_ca = "/etc/node-agent/ca.pem"
        tls_cert = "/etc/node-agent/node.pem"
        tls_key = "/etc/node-agent/node.key"
        tls_domain = "registry.internal"
        "#,
        Path::new("t.toml"),
    )
    .unwrap();
    let config = AgentConfig::resolve(cli(&["--node-id", "n1"]), file.clone()).unwrap();
    assert_eq!(
        config.auth_token,
        Some(TokenSource::File("/etc/node-agent/token".into()))
    );
    assert_eq!(
        config.tls,
        TlsConfig {
            ca: Some("/etc/node-agent/ca.pem".into()),
            cert: Some("/etc/node-agent/node.pem".into()),
            key: Some("/etc/node-agent/node.key".into()),
            domain: Some("registry.internal".into()),
        }
    );

    let config = AgentConfig::resolve(
        cli(&[
            "--node-id",
            "n1",
            "--auth-token-file",
            "/run/secrets/token",
            "--tls-domain",
            "10.0.0.9",
            "--tls-ca",
            "/ca.pem",
        ]),
        file,
    )
    .unwrap();
    assert_eq!(
        config.auth_token,
        Some(TokenSource::File("/run/secrets/token".into()))
    );
    assert_eq!(config.tls.domain.as_deref(), Some("10.0.0.9"));
    assert_eq!(config.tls.ca.as_deref(), Some(Path::new("/ca.pem")));
    assert_eq!(
        config.tls.cert.as_deref(),
        Some(Path::new("/etc/node-agent/node.pem"))
    );
}

#[test]
fn a_token_and_a_token_file_together_are_refused() {
    let both_flags = cli(&[
        "--node-id",
        "n1",
        "--auth-token-file",
        "/etc/node-agent/token",
        "--auth-token",
        TOKEN,
    ]);
    let from_file = FileConfig::parse(
        "auth_token_file = \"/etc/node-agent/token\"\n",
        Path::new("t"),
    )
    .unwrap();
    let flag_token = cli(&["--node-id", "n1", "--auth-token", TOKEN]);
    for (flags, file) in [
        (both_flags, FileConfig::default()),
        (flag_token.clone(), from_file),
    ] {
        let err = AgentConfig::resolve(flags, file).unwrap_err().to_string();
        assert!(
            err.contains("NODE_AGENT_AUTH_TOKEN_FILE") && err.contains("NODE_AGENT_AUTH_TOKEN)"),
            "{err}"
        );
        assert!(!err.contains(TOKEN), "{err}");
    }

    // Alone, the token is taken as is.
    let config = AgentConfig::resolve(flag_token, FileConfig::default()).unwrap();
    assert_eq!(
        config.auth_token,
        Some(TokenSource::Value(Secret::new(TOKEN)))
    );
}

#[test]
fn the_config_file_may_not_hold_the_token_itself() {
    let file = FileConfig::parse(&format!("auth_token = \"{TOKEN}\"\n"), Path::new("t")).unwrap();
    let err = AgentConfig::resolve(cli(&["--node-id", "n1"]), file)
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth_token_file"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
}

#[test]
fn a_bad_token_is_refused_without_being_quoted() {
    for bad in ["short-secret", "two words-aaaaaaaaaaaaaaaaaa"] {
        let err = AgentConfig::resolve(
            cli(&["--node-id", "n1", "--auth-token", bad]),
            FileConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid auth token"), "{err}");
        assert!(!err.contains(bad), "{err}");
    }
    // Nor does a printed configuration show it.
    let config = AgentConfig::resolve(
        cli(&["--node-id", "n1", "--auth-token", TOKEN]),
        FileConfig::default(),
    )
    .unwrap();
    let debug = format!("{config:?} {:?}", cli(&["--auth-token", TOKEN]));
    assert!(!debug.contains(TOKEN), "{debug}");
}

#[test]
fn https_registries_need_a_ca_and_take_tls_settings() {
    let err = AgentConfig::resolve(
        cli(&["--node-id", "n1", "--registry", "https://registry:50051"]),
        FileConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--tls-ca"), "{err}");
    let config = AgentConfig::resolve(
        cli(&[
            "--node-id",
            "n1",
            "--registry",
            "https://10.0.0.9:50051",
            "--tls-ca",
            "/ca.pem",
            "--tls-cert",
            "/node.pem",
            "--tls-key",
            "/node.key",
            "--tls-domain",
            "registry.internal",
        ]),
        FileConfig::default(),
    )
    .unwrap();
    assert_eq!(config.registry, "https://10.0.0.9:50051");
    assert!(config.tls.is_set());
    assert_eq!(config.tls.key.as_deref(), Some(Path::new("/node.key")));
}

#[test]
fn the_token_variable_is_hidden_in_help() {
    let command = Cli::command();
    let token = command
        .get_arguments()
        .find(|a| a.get_id() == "auth_token")
        .unwrap();
    assert!(token.is_hide_env_values_set());
    assert_eq!(
        token.get_env().and_then(|e| e.to_str()),
        Some("NODE_AGENT_AUTH_TOKEN")
    );
}
