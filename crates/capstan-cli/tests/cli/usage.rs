//! `capstan provider describe` and `capstan provider call`, run as a user would.

use std::path::PathBuf;
use std::process::{Command, Output};

fn capstan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capstan"))
        .args(args)
        .output()
        .unwrap()
}

/// The testing provider, built beside `capstan` by `cargo test --workspace`.
fn testing_provider() -> String {
    let path =
        PathBuf::from(env!("CARGO_BIN_EXE_capstan")).with_file_name("capstan-provider-testing");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace`",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `capstan provider call --type TYPE --inputs INPUTS -- PROVIDER`.
fn provider_call(provider: &str, resource_type: &str, inputs: &str) -> Output {
    capstan(&[
        "provider",
        "call",
        "--type",
        resource_type,
        "--inputs",
        inputs,
        "--",
        provider,
    ])
}

#[test]
fn describe_prints_the_handshake_as_json() {
    let provider = testing_provider();
    let out = capstan(&["provider", "describe", "--", &provider]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(info["name"], "testing");
    assert_eq!(info["protocol"], 1);
    let chatty = info["resourceTypes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "chatty")
        .unwrap();
    assert_eq!(chatty["outputs"][0]["name"], "count");
}

#[test]
fn call_shows_progress_on_stderr_and_outputs_on_stdout() {
    let provider = testing_provider();
    let out = provider_call(&provider, "chatty", r#"{"count": 3}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let outputs: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is only the outputs");
    assert_eq!(outputs, serde_json::json!({"count": 3}));
    let stderr = text(&out.stderr);
    for needle in [
        "▶ chatter count=3",
        "info chatter: event 0 n=0",
        "event 2",
        "■ chatter",
        "create chatty `cli` done",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn large_inputs_and_outputs_cross_in_many_segments() {
    // Messages start with a small first segment (the transport caps it at 1 KiB): inputs and
    // outputs much larger than that must arrive whole, both ways.
    let provider = testing_provider();
    let value: String = (0..50_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let inputs = serde_json::json!({ "value": value }).to_string();
    let out = provider_call(&provider, "noop", &inputs);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let outputs: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is only the outputs");
    assert_eq!(outputs["value"].as_str(), Some(value.as_str()));
}

#[test]
fn call_with_json_streams_events_then_the_result() {
    let provider = testing_provider();
    let out = capstan(&[
        "provider",
        "call",
        "--json",
        "--type",
        "sleep",
        "--inputs",
        r#"{"ms": 20}"#,
        "--",
        &provider,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines[0]["type"], "progress");
    assert_eq!(lines[0]["kind"], "phase");
    assert_eq!(lines[0]["name"], "sleeping");
    assert!(lines
        .iter()
        .any(|l| l["kind"] == "counter" && l["done"] == 10 && l["expected"] == 10));
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "result");
    assert_eq!(last["ok"], true);
    assert_eq!(last["outputs"], serde_json::json!({"slept_ms": 20}));
}

#[test]
fn failures_exit_1_with_the_message_and_usage_errors_exit_2() {
    let provider = testing_provider();
    let out = provider_call(&provider, "fail", r#"{"message": "nope, not today"}"#);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("nope, not today"));
    assert!(out.stdout.is_empty());

    // Inputs that do not fit the type are the provider's invalid-input error, naming the field.
    let out = provider_call(&provider, "noop", r#"{"valeu": 1}"#);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("input `valeu` is invalid: unknown field `valeu`"),
        "{stderr}"
    );

    let out = capstan(&[
        "provider",
        "call",
        "--type",
        "unknown-type",
        "--",
        &provider,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("it serves: noop"),
        "{}",
        text(&out.stderr)
    );

    let out = provider_call(&provider, "noop", "{not json");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--inputs: not valid JSON"));

    let out = capstan(&["provider", "describe", "--", "/definitely/not/here"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not found"));
}

#[test]
fn help_lists_every_exit_code_a_script_can_see() {
    // Issue 20: --help's exit codes left out --detailed-exitcode's 2 and a declined prompt's 1.
    let out = capstan(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for said in [
        "1 some resource failed (or \"delete everything?\" was declined)",
        "With `plan --detailed-exitcode`: 0 no changes, 2 changes, 1 any error.",
        "141 finished but its output was closed",
    ] {
        assert!(help.contains(said), "`{said}` is not in:\n{help}");
    }
}

/// A program that floods its output (`yes`) is not relayed whole: a burst, then a trickle,
/// with what was left out counted; the handshake still times out on time.
#[test]
fn a_flood_of_output_is_counted_not_relayed() {
    let child = std::process::Command::new(crate::support::capstan_bin())
        .args(["provider", "describe", "--", "yes"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = crate::support::output_within(child, "provider describe -- yes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("did not answer the handshake"),
        "{}",
        &stderr[stderr.len().saturating_sub(2000)..]
    );
    assert!(
        stderr.contains("line(s) of output not shown"),
        "the flood is counted"
    );
    assert!(
        out.stderr.len() < 1024 * 1024,
        "{} bytes relayed",
        out.stderr.len()
    );
}

/// Every provider a deployment may name as `{"builtin": NAME}` can be described by that name
/// (`machine` was refused here while deployments took it).
#[test]
fn every_builtin_provider_can_be_described() {
    for (name, types) in [
        ("local", &["file", "exec", "memo"][..]),
        ("nix", &["build", "activate"][..]),
        ("machine", &["nixos"][..]),
    ] {
        let out = capstan(&["provider", "describe", name]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let described: Vec<&str> = info["resourceTypes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        for t in types {
            assert!(described.contains(t), "{name}: {described:?} lacks {t}");
        }
    }
}
