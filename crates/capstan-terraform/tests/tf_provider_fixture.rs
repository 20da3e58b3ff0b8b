//! Against a provider built with the crates.io crate `tf-provider` (an independent Rust
//! implementation of the provider side of protocol 6 over go-plugin: loopback TCP, TLS with a
//! client certificate it refuses if marked a CA): `tests/tf-fixture`, built by the test.

use std::path::PathBuf;
use std::time::Duration;

use capstan_terraform::{provider_info, wire, Plugin, StartOptions, TerraformError};
use serde_json::json;

fn fixture() -> Option<PathBuf> {
    static BINARY: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| match capstan_test_support::fetch::fixture_provider() {
            Ok(binary) => Some(binary),
            Err(e) => {
                capstan_test_support::skip_or_fail(&e);
                None
            }
        })
        .clone()
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn protocol_6_over_tcp_with_and_without_mtls() {
    let Some(binary) = fixture() else { return };
    run(async {
        for mtls in [true, false] {
            let plugin = Plugin::start_with(
                &binary,
                StartOptions {
                    mtls,
                    ..StartOptions::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("mtls {mtls}: {e}"));
            assert_eq!(plugin.protocol, wire::Protocol::V6);
            assert_eq!(plugin.handshake.network, "tcp");
            assert_eq!(plugin.tls, mtls);
            let schema = plugin.schema().await.unwrap();
            let info = provider_info("fx", &schema);
            let file = info.resource_type("capstanfixture_file").expect("file");
            let input = |n: &str| file.inputs.iter().find(|i| i.name == n);
            assert!(input("path").unwrap().required);
            assert!(input("secret").unwrap().sensitive);
            assert!(input("token").is_none(), "computed only: not an input");
            assert!(file
                .outputs
                .iter()
                .any(|o| o.name == "token" && o.sensitive));
            // The nested block is an input holding a list of objects.
            assert!(input("tag")
                .unwrap()
                .description
                .contains("list of objects"));
            assert!(info.resource_type("data.capstanfixture_read").is_some());
            assert!(schema.provider_meta.is_some(), "it declares provider_meta");
            plugin.stop().await;
        }
    });
}

#[test]
fn the_life_cycle_through_protocol_6() {
    let Some(binary) = fixture() else { return };
    let root = tempfile::tempdir().unwrap();
    run(async {
        let plugin = Plugin::start(&binary, Duration::from_secs(20))
            .await
            .unwrap();
        let schema = plugin.schema().await.unwrap();
        let mut warnings = Vec::new();
        // ValidateProviderConfig: its own diagnostic, with the attribute it is about.
        let error = plugin
            .configure(&schema, &json!({"root": "relative"}), &mut warnings)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("root must be an absolute path")
                && error.to_string().contains("(at `root`)"),
            "{error}"
        );
        plugin
            .configure(&schema, &json!({"root": root.path()}), &mut warnings)
            .await
            .unwrap();
        let config = json!({"path": "a.txt", "content": "hello", "tag": [{"key": "k"}]});
        let (state, private) = plugin
            .create(&schema, "capstanfixture_file", &config, &mut warnings)
            .await
            .unwrap();
        assert_eq!(state["id"], "a.txt");
        assert_eq!(state["size"], 5);
        assert_eq!(state["tag"], json!([{"key": "k", "value": null}]));
        let token = state["token"].as_str().expect("a token").to_string();
        assert_eq!(
            std::fs::read_to_string(root.path().join("a.txt")).unwrap(),
            "hello"
        );
        // An update in place keeps the computed token (the proposed new state carries it).
        let changed = json!({"path": "a.txt", "content": "hello, world", "tag": [{"key": "k"}]});
        let (updated, private) = plugin
            .update(
                &schema,
                "capstanfixture_file",
                &state,
                &private,
                &changed,
                &mut warnings,
            )
            .await
            .unwrap();
        assert_eq!(updated["token"], token.as_str());
        assert_eq!(updated["size"], 12);
        // A new path forces a new resource.
        let moved = json!({"path": "b.txt", "content": "x"});
        let replace = plugin
            .update(
                &schema,
                "capstanfixture_file",
                &updated,
                &private,
                &moved,
                &mut warnings,
            )
            .await
            .unwrap_err();
        match &replace {
            TerraformError::ReplaceRequired { paths, .. } => assert_eq!(paths, &["path"]),
            other => panic!("{other}"),
        }
        // ValidateResourceConfig, with the attribute path.
        let error = plugin
            .create(
                &schema,
                "capstanfixture_file",
                &json!({"path": "c.txt", "content": "forbidden words"}),
                &mut warnings,
            )
            .await
            .unwrap_err();
        assert!(error.to_string().contains("(at `content`)"), "{error}");
        assert!(!root.path().join("c.txt").exists());
        // A data source reads what the resource made.
        let read = plugin
            .read_data(
                &schema,
                "capstanfixture_read",
                &json!({"path": "a.txt"}),
                &mut warnings,
            )
            .await
            .unwrap();
        assert_eq!(read["content"], "hello, world");
        assert_eq!(read["exists"], true);
        // Deleted behind its back: the read finds it gone.
        std::fs::remove_file(root.path().join("a.txt")).unwrap();
        let gone = plugin
            .read(
                &schema,
                "capstanfixture_file",
                &updated,
                &private,
                &mut warnings,
            )
            .await
            .unwrap();
        assert!(gone.is_none());
        // A failing apply: the error with its detail and attribute; the warning beside it.
        let error = plugin
            .create(
                &schema,
                "capstanfixture_slow",
                &json!({"seconds": 0.1, "fail": true, "label": "x"}),
                &mut warnings,
            )
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{}: the fixture was told to fail (at `fail`): fail = true in x",
                binary.display()
            )
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("slow things are slow")),
            "{warnings:?}"
        );
        plugin
            .delete(
                &schema,
                "capstanfixture_file",
                &updated,
                &private,
                &mut warnings,
            )
            .await
            .unwrap();
        plugin.stop().await;
    });
}

#[test]
fn its_log_lines_are_read_with_their_levels() {
    let Some(binary) = fixture() else { return };
    let root = tempfile::tempdir().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    run(async {
        let plugin = Plugin::start_with(
            &binary,
            StartOptions {
                logs: Some(std::sync::Arc::new(move |line| {
                    sink.lock().unwrap().push(line)
                })),
                ..StartOptions::default()
            },
        )
        .await
        .unwrap();
        let schema = plugin.schema().await.unwrap();
        let mut warnings = Vec::new();
        plugin
            .configure(&schema, &json!({"root": root.path()}), &mut warnings)
            .await
            .unwrap();
        plugin
            .create(
                &schema,
                "capstanfixture_slow",
                &json!({"seconds": 0.3, "label": "logged"}),
                &mut warnings,
            )
            .await
            .unwrap();
        plugin.stop().await;
    });
    let lines = lines.lock().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.message.contains("slow logged: step 1 of 3") && l.level.is_none()),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.message.starts_with("slow logged progress") && l.level == Some("info")),
        "{lines:?}"
    );
}

#[test]
fn a_state_of_an_older_schema_version_is_sent_to_upgrade_resource_state() {
    let Some(binary) = fixture() else { return };
    let root = tempfile::tempdir().unwrap();
    run(async {
        let plugin = Plugin::start(&binary, Duration::from_secs(20))
            .await
            .unwrap();
        let schema = plugin.schema().await.unwrap();
        assert_eq!(
            capstan_terraform::schema_version(&schema, "capstanfixture_file"),
            2
        );
        let mut warnings = Vec::new();
        plugin
            .configure(&schema, &json!({"root": root.path()}), &mut warnings)
            .await
            .unwrap();
        let state = json!({"id": "a", "path": "a", "content": "x", "size": 1, "token": "t"});
        // The current version is not sent at all.
        let same = plugin
            .upgrade(&schema, "capstanfixture_file", 2, &state, &mut warnings)
            .await
            .unwrap();
        assert_eq!(same, state);
        // Sent anyway (as Terraform core does), tf-provider answers with the state in JSON,
        // not MessagePack: read all the same.
        let answered = plugin
            .upgrade_state("capstanfixture_file", 2, &state, &mut warnings)
            .await
            .unwrap();
        assert_eq!(answered["content"], "x");
        assert_eq!(answered["size"], 1);
        // An older one is: tf-provider 0.2.2 cannot upgrade (its hook's argument type is
        // private to the crate), and says so; the answer is its own.
        let error = plugin
            .upgrade(&schema, "capstanfixture_file", 1, &state, &mut warnings)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("Upgrade is not supported"),
            "{error}"
        );
        plugin.stop().await;
    });
}

/// go-plugin's `ConnInfo` (the broker's message), for the test below only.
#[derive(Clone, PartialEq, prost::Message)]
struct ConnInfo {
    #[prost(uint32, tag = "1")]
    service_id: u32,
    #[prost(string, tag = "2")]
    network: String,
    #[prost(string, tag = "3")]
    address: String,
}

/// What a plugin writes to go-plugin's `GRPCStdio` stream reaches the log sink as its stdout.
/// tf-provider writes there only from its broker ("relay …" for each `ConnInfo` the host
/// sends on `GRPCBroker.StartStream`), so the test sends one.
#[test]
fn grpc_stdio_output_reaches_the_log_sink() {
    let Some(binary) = fixture() else { return };
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    run(async {
        let plugin = Plugin::start_with(
            &binary,
            StartOptions {
                logs: Some(std::sync::Arc::new(move |line| {
                    sink.lock().unwrap().push(line)
                })),
                ..StartOptions::default()
            },
        )
        .await
        .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ConnInfo>();
        let outgoing = tokio_stream_of(rx);
        let channel = plugin.channel();
        let broker = tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let _ = grpc
                .streaming(
                    tonic::Request::new(outgoing),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/plugin.GRPCBroker/StartStream",
                    ),
                    tonic::codec::ProstCodec::<ConnInfo, ConnInfo>::default(),
                )
                .await;
        });
        // The stdio stream is read from the start; resend until a relay line comes back.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let found = loop {
            let _ = tx.send(ConnInfo {
                service_id: 7,
                network: "unix".into(),
                address: "/nowhere".into(),
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen = lines
                .lock()
                .unwrap()
                .iter()
                .any(|l: &capstan_terraform::LogLine| {
                    l.channel == capstan_terraform::Channel::StdioOut && l.message.contains("relay")
                });
            if seen || std::time::Instant::now() > deadline {
                break seen;
            }
        };
        assert!(found, "{:?}", lines.lock().unwrap());
        broker.abort();
        plugin.stop().await;
    });
}

/// A stream of what `rx` receives.
fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
