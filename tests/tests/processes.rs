//! Real provider processes over real Unix sockets: the testing provider, and small shell
//! scripts that misbehave on purpose.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use capstan_host::{
    CallError, ExitDescription, HostOptions, LaunchError, OperationCall, ProviderCommand,
    ProviderConnection, ProviderSource,
};
use capstan_schema::{ErrorKind, OperationKind, ProgressKind};
use capstan_tests::{
    launch_testing, process_alive, run_local, testing_provider, testing_source, wait_until,
    Recorder,
};
use serde_json::json;

fn create(resource_type: &str, inputs: serde_json::Value) -> OperationCall {
    OperationCall::new(
        OperationKind::Create,
        resource_type,
        &format!("res.{resource_type}"),
        inputs,
    )
}

fn shell(script: &str) -> ProviderSource {
    ProviderSource::Command(ProviderCommand::new("/bin/sh", ["-c", script]))
}

async fn launch_err(source: &ProviderSource, options: HostOptions) -> LaunchError {
    match ProviderConnection::launch("bad", source, options, None).await {
        Ok(_) => panic!("the launch should fail"),
        Err(e) => e,
    }
}

#[test]
fn the_testing_provider_serves_every_documented_type() {
    run_local(async {
        let provider = launch_testing(&[]).await;
        let names: Vec<&str> = provider
            .info()
            .resource_types
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        for expected in [
            "noop", "handle", "sleep", "fail", "panic", "crash", "hang", "chatty", "big", "corrupt",
        ] {
            assert!(names.contains(&expected), "missing {expected}: {names:?}");
        }
        let report = provider.shutdown().await;
        assert!(report.acknowledged);
        let process = report.process.expect("a process");
        assert_eq!(
            process.escalated_to, None,
            "it exited by itself after shutdown"
        );
        assert_eq!(process.status, ExitDescription::Code(0));
    });
}

#[test]
fn a_provider_that_will_not_exit_is_terminated_then_killed() {
    run_local(async {
        let options = HostOptions {
            shutdown_grace: Duration::from_millis(200),
            term_grace: Duration::from_millis(200),
            ..HostOptions::default()
        };
        let provider =
            ProviderConnection::launch("stubborn", &testing_source(&["--linger"]), options, None)
                .await
                .unwrap();
        let pid = provider.pid().unwrap();
        let report = provider.shutdown().await.process.expect("a process");
        assert_eq!(
            report.escalated_to,
            Some(libc::SIGKILL),
            "SIGTERM was ignored, so SIGKILL followed"
        );
        assert_eq!(report.status, ExitDescription::Signal(libc::SIGKILL));
        assert!(!process_alive(pid));
    });
}

#[test]
fn processes_a_provider_leaves_behind_are_killed_and_reported() {
    run_local(async {
        let provider = launch_testing(&["--leak-child"]).await;
        let pid = provider.pid().unwrap();
        let report = provider.shutdown().await.process.expect("a process");
        assert_eq!(report.status, ExitDescription::Code(0));
        assert!(
            report.leaked_processes,
            "the sleep it started was still running"
        );
        let group_empty = wait_until(
            Duration::from_secs(5),
            // SAFETY: signal 0 only asks whether the group exists.
            || unsafe { libc::kill(-(pid as i32), 0) } != 0,
        )
        .await;
        assert!(group_empty, "the leaked process was killed");
    });
}

#[test]
fn one_process_serves_many_concurrent_operations() {
    run_local(async {
        let provider = Rc::new(launch_testing(&[]).await);
        let pid = provider.pid().unwrap();
        let calls: Vec<_> = (0..64)
            .map(|n| {
                let p = provider.clone();
                tokio::task::spawn_local(async move {
                    p.call(
                        create("noop", json!({"value": n})),
                        Recorder::default().observer(),
                    )
                    .await
                    .map(|s| s.outputs.value())
                })
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        for (n, call) in calls.into_iter().enumerate() {
            let outputs = call.await.unwrap().unwrap();
            assert_eq!(outputs["value"], json!(n));
            assert!(
                outputs["id"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{pid}-")),
                "served by the one process"
            );
            ids.insert(outputs["id"].as_str().unwrap().to_string());
        }
        assert_eq!(ids.len(), 64);
    });
}

#[test]
fn progress_from_a_chatty_provider_arrives_in_order() {
    run_local(async {
        let provider = launch_testing(&[]).await;
        let rec = Recorder::default();
        let done = provider
            .call(create("chatty", json!({"count": 5000})), rec.observer())
            .await
            .unwrap();
        assert_eq!(done.outputs, json!({"count": 5000}));
        let events = rec.events();
        let numbers: Vec<u64> = events
            .iter()
            .filter_map(|e| match &e.kind {
                ProgressKind::Event { fields, .. } => Some(fields[0].1.parse().unwrap()),
                _ => None,
            })
            .collect();
        assert_eq!(numbers, (0..5000).collect::<Vec<_>>());
        assert!(
            matches!(&events[0].kind, ProgressKind::SpanStart { name, .. } if name == "chatter")
        );
        assert!(events.iter().any(|e| matches!(
            &e.kind,
            ProgressKind::Counter {
                done: 5000,
                expected: 5000,
                ..
            }
        )));
    });
}

#[test]
fn a_capability_made_by_one_provider_process_is_used_by_another() {
    run_local(async {
        let maker = launch_testing(&[]).await;
        let user = launch_testing(&[]).await;
        let made = maker
            .call(
                create("handle", json!({"value": "v"})),
                Recorder::default().observer(),
            )
            .await
            .unwrap();
        let (name, handle) = made.capabilities.into_iter().next().expect("a handle");
        assert_eq!(name, "handle");
        let mut call = create("noop", json!({}));
        call.capabilities.push(("from-maker".into(), handle));
        let used = user
            .call(call, Recorder::default().observer())
            .await
            .unwrap();
        let used_outputs = used.outputs.value();
        let seen = &used_outputs["handles"][0];
        assert_eq!(seen["name"], "from-maker");
        assert_eq!(seen["kind"], "testing-handle");
        assert_eq!(seen["address"], "res.handle");
        let summary: serde_json::Value =
            serde_json::from_str(seen["summary"].as_str().unwrap()).unwrap();
        assert_eq!(
            summary["pid"],
            json!(maker.pid().unwrap()),
            "the call went back to the maker process"
        );
    });
}

#[test]
fn provider_failures_keep_their_kind_message_and_details() {
    run_local(async {
        let provider = launch_testing(&[]).await;
        let err = provider
            .call(
                create("fail", json!({"kind": "transient", "message": "try later"})),
                Recorder::default().observer(),
            )
            .await
            .err()
            .unwrap();
        match err {
            CallError::Failed { address, error } => {
                assert_eq!(address, "res.fail");
                assert_eq!(error.kind, ErrorKind::Transient);
                assert_eq!(error.message, "try later");
                assert!(error.details.contains("line 2"));
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_panicking_provider_fails_that_operation_and_keeps_serving() {
    run_local(async {
        let provider = launch_testing(&[]).await;
        let err = provider
            .call(
                create("panic", json!({"message": "kaboom"})),
                Recorder::default().observer(),
            )
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), Some(ErrorKind::Internal));
        assert!(err.to_string().contains("kaboom"));
        assert!(provider
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
    });
}

/// The error of a call during which the provider crashes. A crash the host did not notice
/// would leave the call waiting forever: the deadline fails the test instead.
async fn crash_with(mode: &str) -> CallError {
    let crashing = launch_testing(&[]).await;
    let call = crashing.call(
        create("crash", json!({"mode": mode, "code": 7})),
        Recorder::default().observer(),
    );
    tokio::time::timeout(Duration::from_secs(90), call)
        .await
        .expect("the crash is reported, not waited on forever")
        .err()
        .expect("a crash fails the call")
}

#[test]
fn a_provider_that_exits_mid_operation_is_reported_with_status_and_stderr() {
    run_local(async {
        let bystander = launch_testing(&[]).await;
        let err = crash_with("exit").await;
        match &err {
            CallError::ProviderExited {
                provider,
                address,
                status,
                tail,
            } => {
                assert_eq!(provider, "testing");
                assert_eq!(address, "res.crash");
                assert_eq!(*status, ExitDescription::Code(7));
                assert!(
                    tail.0.iter().any(|l| l.contains("crashing on purpose")),
                    "{tail:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("exited with status 7") && message.contains("crashing on purpose"),
            "{message}"
        );
        // Other providers are unaffected.
        assert!(bystander
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
    });
}

#[test]
fn a_sigkilled_provider_is_reported_with_the_signal() {
    run_local(async {
        let err = crash_with("sigkill").await;
        assert!(
            matches!(
                &err,
                CallError::ProviderExited {
                    status: ExitDescription::Signal(9),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("SIGKILL"), "{err}");
    });
}

#[test]
fn a_hung_operation_times_out_and_the_provider_sees_the_cancellation() {
    run_local(async {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("cancelled");
        let provider = launch_testing(&[]).await;
        let mut call = create("hang", json!({"cancelMarker": marker}));
        call.timeout = Some(Duration::from_millis(300));
        let err = provider
            .call(call, Recorder::default().observer())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, CallError::Timeout { .. }), "{err:?}");
        assert!(
            err.to_string().contains("did not finish within 300ms"),
            "{err}"
        );
        assert!(
            wait_until(Duration::from_secs(5), || marker.exists()).await,
            "the provider noticed"
        );
        assert!(provider
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
    });
}

#[test]
fn provider_stderr_is_captured_and_attributed() {
    run_local(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let provider = ProviderConnection::launch(
            "chatter-box",
            &testing_source(&["--stderr-lines", "3"]),
            HostOptions::default(),
            Some(tx),
        )
        .await
        .unwrap();
        for k in 0..3 {
            let log = rx.recv().await.unwrap();
            assert_eq!(log.provider, "chatter-box");
            assert_eq!(log.line, format!("testing provider: start-up line {k}"));
        }
        provider.shutdown().await;
    });
}

#[test]
fn a_provider_printing_to_stdout_cannot_corrupt_the_protocol() {
    run_local(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let provider = ProviderConnection::launch(
            "printer",
            &testing_source(&[]),
            HostOptions::default(),
            Some(tx),
        )
        .await
        .unwrap();
        let done = provider
            .call(
                create("noop", json!({"value": 1, "print": "hello from println"})),
                Recorder::default().observer(),
            )
            .await
            .unwrap();
        assert_eq!(done.outputs.get("value"), Some(json!(1)));
        let log = rx.recv().await.expect("the printed line arrives as a log");
        assert_eq!(log.line, "hello from println");
        assert_eq!(
            log.stream,
            capstan_schema::LogStream::Stderr,
            "stdout was pointed at stderr"
        );
        assert!(provider
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
    });
}

#[test]
fn launch_errors_say_what_is_wrong() {
    run_local(async {
        let missing = ProviderSource::Command(ProviderCommand::new(
            "/no/such/provider",
            Vec::<String>::new(),
        ));
        let err = launch_err(&missing, HostOptions::default()).await;
        assert!(matches!(err, LaunchError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("/no/such/provider"));

        let not_on_path = ProviderSource::Command(ProviderCommand::new(
            "capstan-no-such-provider",
            Vec::<String>::new(),
        ));
        let err = launch_err(&not_on_path, HostOptions::default()).await;
        assert!(err.to_string().contains("not found on PATH"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = launch_err(
            &ProviderSource::Command(ProviderCommand::new(&plain, Vec::<String>::new())),
            HostOptions::default(),
        )
        .await;
        assert!(matches!(err, LaunchError::NotExecutable { .. }), "{err:?}");
        assert!(err.to_string().contains("chmod +x"), "{err}");

        let err = launch_err(
            &shell("echo 'cannot open config' >&2; exit 4"),
            HostOptions::default(),
        )
        .await;
        match &err {
            LaunchError::ExitedEarly { status, tail, .. } => {
                assert_eq!(*status, ExitDescription::Code(4));
                assert_eq!(tail.0, vec!["cannot open config".to_string()]);
            }
            other => panic!("{other:?}"),
        }

        let err = launch_err(
            &testing_source(&["--protocol", "7:9"]),
            HostOptions::default(),
        )
        .await;
        assert!(
            matches!(err, LaunchError::Incompatible { theirs: (7, 9), .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("upgrade capstan"), "{err}");

        let err = launch_err(
            &shell("exec sleep 30"),
            HostOptions {
                handshake_timeout: Duration::from_millis(300),
                ..HostOptions::default()
            },
        )
        .await;
        assert!(
            matches!(err, LaunchError::HandshakeTimeout { .. }),
            "{err:?}"
        );
    });
}

#[test]
fn garbage_on_the_socket_closes_that_connection_with_a_clear_error() {
    run_local(async {
        let bystander = launch_testing(&[]).await;
        // Nonsense where a message header should be.
        let err = launch_err(
            &shell("printf 'HTTP/1.1 200 OK\\r\\n\\r\\n' >&3; exec sleep 30"),
            HostOptions::default(),
        )
        .await;
        assert!(matches!(err, LaunchError::Protocol { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("does not speak the Capstan protocol"),
            "{err}"
        );
        // A header promising more than arrives, then the provider exits.
        let err = launch_err(
            &shell("printf '\\000\\000\\000\\000\\020\\000\\000\\000abc' >&3; exit 0"),
            HostOptions::default(),
        )
        .await;
        assert!(
            matches!(
                err,
                LaunchError::ExitedEarly { .. } | LaunchError::Protocol { .. }
            ),
            "{err:?}"
        );
        // A header promising more than arrives, and the provider stays silent.
        let err = launch_err(
            &shell("printf '\\000\\000\\000\\000\\020\\000\\000\\000abc' >&3; exec sleep 30"),
            HostOptions {
                handshake_timeout: Duration::from_millis(300),
                ..HostOptions::default()
            },
        )
        .await;
        assert!(
            matches!(err, LaunchError::HandshakeTimeout { .. }),
            "{err:?}"
        );
        // A header announcing a segment of 2^28 words: over the limit, refused before allocating.
        let err = launch_err(
            &shell("printf '\\000\\000\\000\\000\\000\\000\\000\\020' >&3; exec sleep 30"),
            HostOptions::default(),
        )
        .await;
        assert!(matches!(err, LaunchError::Protocol { .. }), "{err:?}");
        // Garbage in the middle of a live connection.
        let corrupt = launch_testing(&[]).await;
        let err = corrupt
            .call(create("corrupt", json!({})), Recorder::default().observer())
            .await
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                CallError::Disconnected { .. } | CallError::ProviderExited { .. }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("testing"), "{err}");
        // The host still runs other providers.
        assert!(bystander
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
    });
}

#[test]
fn a_message_over_the_size_limit_closes_only_that_connection() {
    run_local(async {
        let options = HostOptions {
            max_message_words: 64 * 1024,
            ..HostOptions::default()
        }; // 512 KiB
        let big = ProviderConnection::launch("big", &testing_source(&[]), options.clone(), None)
            .await
            .unwrap();
        let bystander =
            ProviderConnection::launch("bystander", &testing_source(&[]), options, None)
                .await
                .unwrap();
        let fits = big
            .call(
                create("big", json!({"bytes": 100_000})),
                Recorder::default().observer(),
            )
            .await
            .unwrap();
        assert_eq!(
            fits.outputs.get("data").unwrap().as_str().unwrap().len(),
            100_000
        );
        let err = big
            .call(
                create("big", json!({"bytes": 2_000_000})),
                Recorder::default().observer(),
            )
            .await
            .err()
            .unwrap();
        // Named for what it is, with the sizes: not a mysterious exit.
        match &err {
            CallError::ResponseTooLarge { bytes, limit, .. } => {
                assert!(*bytes > 2_000_000, "{err}");
                assert_eq!(*limit, 512 * 1024);
            }
            other => panic!("expected ResponseTooLarge, got {other:?}"),
        }
        assert!(err.to_string().contains("--max-message-mib"), "{err}");
        assert!(big.is_closed());
        assert!(bystander
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
    });
}

#[test]
fn a_standing_provider_service_listens_privately_and_cleans_up() {
    run_local(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/provider.sock");
        let mut service = capstan_tests::KillOnDrop(
            std::process::Command::new(testing_provider())
                .args(["--listen", socket.to_str().unwrap()])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        assert!(
            wait_until(Duration::from_secs(10), || socket.exists()).await,
            "the service is listening"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(socket.parent().unwrap()), 0o700);
        assert_eq!(mode(&socket), 0o600);

        let source = ProviderSource::Socket {
            path: socket.clone(),
            owner: None,
        };
        let first = ProviderConnection::launch("svc", &source, HostOptions::default(), None)
            .await
            .unwrap();
        let second = ProviderConnection::launch("svc", &source, HostOptions::default(), None)
            .await
            .unwrap();
        assert!(first
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
        assert!(second
            .call(create("noop", json!({})), Recorder::default().observer())
            .await
            .is_ok());
        first.shutdown().await;
        second.shutdown().await;

        // SAFETY: signals a process this test started; no memory is touched.
        unsafe { libc::kill(service.id() as i32, libc::SIGTERM) };
        let status = service.wait().unwrap();
        assert!(status.success(), "{status:?}");
        assert!(!socket.exists(), "the socket file is removed on exit");
    });
}

#[test]
fn a_socket_activated_service_serves_an_inherited_listening_socket() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    run_local(async {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("activated.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let fd = listener.as_raw_fd();
        // What systemd does: the listening socket as fd 3, LISTEN_FDS=1, LISTEN_PID=<pid>.
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\""])
            .arg(testing_provider())
            .stderr(std::process::Stdio::null());
        // SAFETY: the closure runs between fork and exec and only calls dup2 (async-signal-
        // safe) on a descriptor this test owns.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut service = capstan_tests::KillOnDrop(command.spawn().unwrap());
        drop(listener);
        let source = ProviderSource::Socket {
            path: socket.clone(),
            owner: None,
        };
        let provider =
            ProviderConnection::launch("activated", &source, HostOptions::default(), None)
                .await
                .unwrap();
        assert!(provider
            .call(
                create("noop", json!({"value": 5})),
                Recorder::default().observer()
            )
            .await
            .is_ok());
        provider.shutdown().await;
        // SAFETY: signals a process this test started; no memory is touched.
        unsafe { libc::kill(service.id() as i32, libc::SIGTERM) };
        assert!(service.wait().unwrap().success());
    });
}

#[test]
fn providers_do_not_outlive_a_sigkilled_host() {
    run_local(async {
        let capstan = capstan_tests::workspace_binary("capstan");
        let mut host = tokio::process::Command::new(capstan)
            .args(["provider", "call", "--json", "--type", "hang", "--"])
            .arg(testing_provider())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let host_pid = host.id().unwrap();
        // The provider is running once the operation reports its phase.
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(host.stdout.take().unwrap()).lines();
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("progress before exit");
            if line.contains("hanging") {
                break;
            }
        }
        let children =
            std::fs::read_to_string(format!("/proc/{host_pid}/task/{host_pid}/children")).unwrap();
        let provider_pid: u32 = children
            .split_whitespace()
            .next()
            .expect("a provider child")
            .parse()
            .unwrap();
        assert!(process_alive(provider_pid));
        // SAFETY: signals a process this test started; no memory is touched.
        unsafe { libc::kill(host_pid as i32, libc::SIGKILL) };
        let _ = host.wait().await;
        assert!(
            wait_until(Duration::from_secs(5), || !process_alive(provider_pid)).await,
            "provider {provider_pid} outlived its SIGKILLed host"
        );
    });
}

#[test]
fn a_listen_path_that_is_not_a_socket_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("notes.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let out = output_within(
        std::process::Command::new(testing_provider())
            .args(["--listen", precious.to_str().unwrap()]),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exists and is not a socket; the provider will not delete it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
}

#[test]
fn a_provider_given_someone_elses_listen_pid_says_so() {
    for (pid, shown) in [
        (Some("1"), "LISTEN_PID is `1`"),
        (None, "LISTEN_PID is not set"),
    ] {
        let mut command = std::process::Command::new(testing_provider());
        command.env("LISTEN_FDS", "1").env_remove("LISTEN_PID");
        if let Some(pid) = pid {
            command.env("LISTEN_PID", pid);
        }
        let out = output_within(&mut command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(shown), "{stderr}");
        assert!(stderr.contains("LISTEN_PID=$$ exec"), "{stderr}");
    }
}

/// Runs `command` to its end, failing (not hanging) if it is still running after 30 s.
fn output_within(command: &mut std::process::Command) -> std::process::Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{command:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
