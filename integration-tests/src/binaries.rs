//! The binaries under test, built by the suite itself so that a test never
//! runs a stale binary left over from an earlier build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::HarnessError;

/// Paths of the freshly built binaries, and where their logs go.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `registry-server` executable.
    pub registry_server: PathBuf,
    /// The `node-agent` executable.
    pub node_agent: PathBuf,
    /// The `registry-ctl` executable.
    pub registry_ctl: PathBuf,
    /// The cargo target directory the binaries were built in.
    pub target_dir: PathBuf,
}

/// Builds `registry-server`, `node-agent` and `registry-ctl` once per test process (every
/// test of the process shares the result) and returns their paths.
///
/// The build uses the cargo that runs the tests, the same target directory
/// and the same profile as the test executable, so an up-to-date tree costs
/// one no-op `cargo build`, and a changed source is always rebuilt first.
pub fn binaries() -> Result<&'static Binaries, HarnessError> {
    static BUILT: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|err| err.to_string()))
        .as_ref()
        .map_err(|err| HarnessError::Build(err.clone()))
}

fn build() -> Result<Binaries, HarnessError> {
    let exe = std::env::current_exe()
        .map_err(|err| HarnessError::io("locating the test executable", err))?;
    let layout = TargetLayout::from_test_exe(&exe)?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| HarnessError::Build("integration-tests has no parent directory".into()))?;

    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&layout.target_dir)
        .args([
            "-p",
            "registry-server",
            "-p",
            "node-agent",
            "-p",
            "registry-ctl",
            "--bins",
        ]);
    if layout.profile == "release" {
        cargo.arg("--release");
    } else if layout.profile != "debug" {
        cargo.args(["--profile", &layout.profile]);
    }
    let status = cargo
        .status()
        .map_err(|err| HarnessError::io("running cargo build", err))?;
    if !status.success() {
        return Err(HarnessError::Build(format!(
            "cargo build exited with {status}"
        )));
    }
    Ok(Binaries {
        registry_server: layout.profile_dir.join("registry-server"),
        node_agent: layout.profile_dir.join("node-agent"),
        registry_ctl: layout.profile_dir.join("registry-ctl"),
        target_dir: layout.target_dir,
    })
}

/// Where cargo put the running test executable.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetLayout {
    /// `target/`.
    target_dir: PathBuf,
    /// `target/<profile dir>/`, where binaries land.
    profile_dir: PathBuf,
    /// The cargo profile name (`dev` builds into `debug/`, reported as
    /// "debug").
    profile: String,
}

impl TargetLayout {
    /// Test executables live in `<target>/<profile>/deps/`.
    fn from_test_exe(exe: &Path) -> Result<Self, HarnessError> {
        let unexpected = || {
            HarnessError::Build(format!(
                "{} is not in <target>/<profile>/deps/",
                exe.display()
            ))
        };
        let deps = exe.parent().ok_or_else(unexpected)?;
        if deps.file_name().is_none_or(|name| name != "deps") {
            return Err(unexpected());
        }
        let profile_dir = deps.parent().ok_or_else(unexpected)?;
        let target_dir = profile_dir.parent().ok_or_else(unexpected)?;
        let profile = profile_dir
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(unexpected)?
            .to_owned();
        Ok(Self {
            target_dir: target_dir.to_path_buf(),
            profile_dir: profile_dir.to_path_buf(),
            profile,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_follows_the_test_executable() {
        let layout =
            TargetLayout::from_test_exe(Path::new("/w/target/release/deps/e2e-0123")).unwrap();
        assert_eq!(layout.target_dir, Path::new("/w/target"));
        assert_eq!(layout.profile_dir, Path::new("/w/target/release"));
        assert_eq!(layout.profile, "release");
    }

    #[test]
    fn an_executable_outside_deps_is_refused() {
        let err = TargetLayout::from_test_exe(Path::new("/usr/bin/e2e")).unwrap_err();
        assert!(
            err.to_string().contains("<target>/<profile>/deps/"),
            "{err}"
        );
    }
}
