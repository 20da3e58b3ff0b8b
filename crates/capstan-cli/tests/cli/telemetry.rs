//! A run as one OpenTelemetry trace, received by a real OTLP receiver (PyPI's
//! opentelemetry-proto and grpcio, `fixtures/otlp_receiver.py`) over both protocols: the span
//! tree checked shape by shape, `TRACEPARENT` adopted, the JSON stream's ids the trace's, no
//! secret exported, and a receiver that is gone changing nothing but a note.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::support::{capstan_bin, events, shown, testing_provider};

const SECRET: &str = "otel-secret-never-exported";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// A virtualenv with opentelemetry-proto and grpcio, made once per target directory.
fn python() -> Option<PathBuf> {
    static VENV: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    VENV.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("otlp-venv");
        let python = venv.join("bin/python");
        let ready = venv.join(".installed");
        if ready.exists() {
            return Some(python);
        }
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        if !ok(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
            capstan_test_support::skip_or_fail("python3 -m venv failed: install python3-venv");
            return None;
        }
        if !ok(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "grpcio",
            "opentelemetry-proto",
        ])) {
            capstan_test_support::skip_or_fail(
                "pip install grpcio opentelemetry-proto failed (PyPI unreachable?)",
            );
            return None;
        }
        std::fs::write(&ready, "").unwrap();
        Some(python)
    })
    .clone()
}

/// A running receiver: its port, and the file of spans it received.
struct Receiver {
    child: Child,
    port: u16,
    out: PathBuf,
}

impl Receiver {
    fn start(python: &Path, protocol: &str, dir: &Path) -> Receiver {
        let out = dir.join(format!("spans-{protocol}.jsonl"));
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/fixtures/otlp_receiver.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(protocol)
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the receiver did not start: {line:?}"));
        Receiver { child, port, out }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn deployment(dir: &Path) {
    let markers = dir.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    std::fs::write(
        dir.join("capstan.json"),
        json!({
            "providers": {
                "local": {"builtin": "local"},
                "t": {"executable": testing_provider()}
            },
            "resources": {
                "memo": {"provider": "local", "type": "memo", "inputs": {"value": {"$param": "password"}}},
                "chatty": {"provider": "t", "type": "chatty", "inputs": {"count": 150}},
                "broken": {"provider": "t", "type": "faulty", "inputs": {"dir": markers, "name": "b", "fault": "error"}},
                "after": {"provider": "t", "type": "faulty", "inputs": {"dir": markers, "name": "a", "fault": "none", "after": [{"$ref": "broken#marker"}]}},
                "token": {"provider": "t", "type": "secret", "inputs": {"seed": {"$param": "password"}}},
                "fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 2, "inputs": {"ms": 5}}}
            }
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("s.json"), json!({"password": SECRET}).to_string()).unwrap();
}

fn apply(dir: &Path, protocol: &str, endpoint: &str) -> std::process::Output {
    Command::new(capstan_bin())
        .args(["apply", "--json", "--secrets", "s.json"])
        .current_dir(dir)
        .env("OTEL_TRACES_EXPORTER", "otlp")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_SERVICE_NAME", "deploys")
        .env("OTEL_RESOURCE_ATTRIBUTES", "team=infra")
        .env("TRACEPARENT", format!("00-{TRACE}-{CALLER}-01"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn by_name<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span `{name}` in {:#?}", names(spans)))
}

fn names(spans: &[Value]) -> Vec<&str> {
    spans.iter().filter_map(|s| s["name"].as_str()).collect()
}

#[test]
fn a_run_is_one_trace_with_its_operations_and_what_providers_reported() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    deployment(dir.path());
    let receiver = Receiver::start(&python, "http", dir.path());
    let out = apply(
        dir.path(),
        "http/protobuf",
        &format!("http://127.0.0.1:{}", receiver.port),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "`broken` fails: {}",
        shown(&out)
    );
    assert!(
        !shown(&out).contains("could not be exported"),
        "{}",
        shown(&out)
    );
    let spans = receiver.spans();

    // One trace, the caller's; the run is a child of the caller's span.
    assert!(spans.iter().all(|s| s["trace_id"] == TRACE), "{spans:#?}");
    let run = by_name(&spans, "capstan apply");
    assert_eq!(run["parent_span_id"], CALLER);
    assert_eq!(run["status"]["code"], 2, "the run failed: {run}");
    assert_eq!(run["attributes"]["capstan.summary.failed"], 1);
    assert_eq!(run["resource"]["service.name"], "deploys");
    assert_eq!(run["resource"]["team"], "infra");
    let run_id = run["span_id"].as_str().unwrap();

    // Each operation under the run, with what it was.
    let chatty = by_name(&spans, "create chatty");
    assert_eq!(chatty["parent_span_id"], run_id);
    assert_eq!(chatty["attributes"]["capstan.resource.type"], "chatty");
    assert_eq!(chatty["attributes"]["capstan.provider"], "t");
    assert_eq!(chatty["attributes"]["capstan.operation"], "create");
    assert_eq!(chatty["status"]["code"], 1, "ok: {chatty}");
    // The provider's own `tracing` span under it, with its events and counter.
    let chatter = by_name(&spans, "chatter");
    assert_eq!(chatter["parent_span_id"], chatty["span_id"]);
    assert_eq!(chatter["events"].as_array().unwrap().len(), 150);
    assert_eq!(chatter["attributes"]["capstan.progress.done"], 100);
    let broken = by_name(&spans, "create broken");
    assert_eq!(broken["status"]["code"], 2);
    assert!(broken["status"]["message"]
        .as_str()
        .unwrap()
        .contains("failed on purpose"));
    assert_eq!(broken["attributes"]["error.type"], "permanent");
    let after = by_name(&spans, "create after");
    assert_eq!(after["attributes"]["capstan.outcome"], "skipped");
    assert_eq!(after["attributes"]["capstan.skipped.dependency"], "broken");
    // Children a provider asked for are operations of the run too.
    let fleet = by_name(&spans, "create fleet");
    let kids: Vec<&Value> = spans
        .iter()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("create fleet/"))
        })
        .collect();
    assert_eq!(kids.len(), 2, "{:#?}", names(&spans));
    assert!(
        kids.iter().all(|k| k["parent_span_id"] == fleet["span_id"]),
        "{kids:#?}"
    );

    // The JSON stream names the same spans.
    let stream = events(&out.stdout);
    for event in stream.iter().skip(1) {
        assert_eq!(event["trace_id"], TRACE, "{event}");
    }
    let started = stream
        .iter()
        .find(|e| e["type"] == "resource_start" && e["address"] == "chatty")
        .unwrap();
    assert_eq!(started["span_id"], chatty["span_id"]);

    // The secret was a parameter and a provider printed it: exported nowhere.
    let received = std::fs::read_to_string(&receiver.out).unwrap();
    assert!(!received.contains(SECRET));
    assert!(
        received.contains("issued token"),
        "the provider's event is there, redacted"
    );
}

#[test]
fn grpc_too_and_a_receiver_that_is_gone_changes_nothing_but_a_note() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    deployment(dir.path());
    let receiver = Receiver::start(&python, "grpc", dir.path());
    let out = apply(
        dir.path(),
        "grpc",
        &format!("http://127.0.0.1:{}", receiver.port),
    );
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let spans = receiver.spans();
    assert!(
        spans.iter().any(|s| s["name"] == "capstan apply"),
        "{spans:#?}"
    );
    assert!(spans.iter().any(|s| s["name"] == "create chatty"));
    drop(receiver);

    // Nobody listens any more: the run is the same, and says once what was not exported.
    let again = tempfile::tempdir().unwrap();
    deployment(again.path());
    for protocol in ["grpc", "http/protobuf"] {
        let started = std::time::Instant::now();
        let out = apply(again.path(), protocol, "http://127.0.0.1:9");
        let said = shown(&out);
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert_eq!(said.matches("could not be exported").count(), 1, "{said}");
        // (Not a timing test: a guard that the export never waits long.)
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        let _ = std::fs::remove_dir_all(again.path().join(".capstan"));
    }
}

#[test]
fn off_by_default_and_a_typo_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        r#"{"providers": {"local": {"builtin": "local"}}, "resources": {}}"#,
    )
    .unwrap();
    let out = Command::new(capstan_bin())
        .args(["plan"])
        .current_dir(dir.path())
        .env("OTEL_TRACES_EXPORTER", "otpl")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(
        shown(&out).contains("OTEL_TRACES_EXPORTER=otpl"),
        "{}",
        shown(&out)
    );
    // With --detailed-exitcode, 2 means "changes": the same typo is 1 there.
    let out = Command::new(capstan_bin())
        .args(["plan", "--detailed-exitcode"])
        .current_dir(dir.path())
        .env("OTEL_TRACES_EXPORTER", "otpl")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    // An endpoint the exporter cannot read would be replaced by localhost, silently.
    let out = Command::new(capstan_bin())
        .args(["plan"])
        .current_dir(dir.path())
        .env("OTEL_TRACES_EXPORTER", "otlp")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "collector.example:4318")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(
        shown(&out).contains("OTEL_EXPORTER_OTLP_ENDPOINT=collector.example:4318: "),
        "{}",
        shown(&out)
    );
}

/// A deployment in Nix whose second stage builds a derivation with the nix provider: the
/// evaluation stages and Nix's own activity tree (the build) in the trace.
#[test]
fn evaluation_stages_and_nix_builds_are_spans_of_the_run() {
    if !crate::support::nix_tool("nix-build", "the OpenTelemetry test of Nix builds") {
        return;
    }
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    std::fs::write(
        dir.path().join("thing.nix"),
        format!(
            r#"derivation {{
  name = "otel-test";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  nonce = "{nonce}";
  args = [ "-c" "echo building; echo made > $out" ];
}}"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("capstan.nix"),
        r#"{ capstan, resources, ... }:
{
  providers.local = capstan.builtin "local";
  providers.nix = capstan.builtin "nix";
  resources = {
    config = { provider = "local"; type = "memo"; inputs.value = "thing.nix"; };
    later = capstan.nested ({ resources, ... }: {
      thing = { provider = "nix"; type = "build";
                inputs = { file = resources.config.outputs.value;
                           args = [ "--option" "substituters" "" "--option" "sandbox" "false" ]; }; };
    });
  };
}
"#,
    )
    .unwrap();
    let receiver = Receiver::start(&python, "http", dir.path());
    let out = Command::new(capstan_bin())
        .args(["apply"])
        .current_dir(dir.path())
        .env("OTEL_TRACES_EXPORTER", "otlp")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", receiver.port),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    let spans = receiver.spans();
    let run = by_name(&spans, "capstan apply");
    let stages: Vec<&Value> = spans
        .iter()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("evaluate stage"))
        })
        .collect();
    assert!(stages.len() >= 2, "{:#?}", names(&spans));
    assert!(stages.iter().all(|s| s["parent_span_id"] == run["span_id"]));
    let build = by_name(&spans, "create later.thing");
    // Nix's activities under the build, parent to child.
    let nix: Vec<&Value> = spans
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with("nix ")))
        .collect();
    assert!(!nix.is_empty(), "{:#?}", names(&spans));
    let ids: Vec<&Value> = nix.iter().map(|s| &s["span_id"]).collect();
    for span in &nix {
        let parent = &span["parent_span_id"];
        assert!(
            *parent == build["span_id"] || ids.contains(&parent),
            "{span:#} is not under the build"
        );
    }
    assert!(
        nix.iter().any(|s| s["name"] == "nix build"),
        "{:#?}",
        names(&spans)
    );
}

#[test]
fn a_receiver_killed_mid_run_leaves_the_run_as_it_was() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        json!({
            "providers": {"t": {"executable": testing_provider()}},
            "resources": {
                "quick": {"provider": "t", "type": "chatty", "inputs": {"count": 1}},
                "slow": {"provider": "t", "type": "chatty", "inputs": {"count": 40, "delay_ms": 50}}
            }
        })
        .to_string(),
    )
    .unwrap();
    let mut receiver = Receiver::start(&python, "http", dir.path());
    let child = Command::new(capstan_bin())
        .args(["apply"])
        .current_dir(dir.path())
        .env("OTEL_TRACES_EXPORTER", "otlp")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", receiver.port),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    crate::support::wait_until("the quick operation's span arrives", || {
        receiver.spans().iter().any(|s| s["name"] == "create quick")
    });
    receiver.child.kill().unwrap();
    receiver.child.wait().unwrap();
    let out = crate::support::output_within(child, "the apply whose receiver was killed");
    let said = shown(&out);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches("could not be exported").count(), 1, "{said}");
    let plan = Command::new(capstan_bin())
        .args(["plan", "--detailed-exitcode"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(plan.status.code(), Some(0), "{}", shown(&plan));
}
