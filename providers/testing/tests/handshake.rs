//! The testing provider binary starts, answers the handshake, and refuses to run by hand.

use std::process::Command;

#[test]
fn run_by_hand_it_explains_itself_instead_of_hanging() {
    let output = Command::new(env!("CARGO_BIN_EXE_capstan-provider-testing"))
        .env_remove("LISTEN_FDS")
        .env_remove("CAPSTAN_PROVIDER_LISTEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty(), "nothing on stdout");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("capstan provider describe"), "{stderr}");
}

#[test]
fn it_answers_the_handshake_through_the_host() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        let source = capstan_host::ProviderSource::Command(capstan_host::ProviderCommand::new(
            env!("CARGO_BIN_EXE_capstan-provider-testing"),
            Vec::<String>::new(),
        ));
        let provider =
            capstan_host::ProviderConnection::launch("testing", &source, Default::default(), None)
                .await
                .unwrap();
        assert_eq!(provider.info().name, "testing");
        assert_eq!(provider.info().version, env!("CARGO_PKG_VERSION"));
        provider.shutdown().await;
    });
}
