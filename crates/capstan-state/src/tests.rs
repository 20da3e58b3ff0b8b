use super::*;
use serde_json::json;

fn done(address: &str, n: i64) -> Record {
    Record::Done {
        address: address.into(),
        state: ResourceState {
            parent: None,
            sensitive: vec![],
            tainted: false,
            provider: "p".into(),
            resource_type: "t".into(),
            inputs: json!({"n": n}).into(),
            outputs: json!({"n": n}).into(),
            dependencies: vec![],
        },
    }
}

fn intent(address: &str) -> Record {
    Record::Intent {
        address: address.into(),
        operation: OperationKind::Create,
        provider: "p".into(),
        resource_type: "t".into(),
        inputs: Json::empty_object(),
        time: 1,
        run: None,
        sensitive: vec![],
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn records_survive_reopening_and_pending_operations_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        backend.load().unwrap();
        block_on(append_durably(
            &backend,
            vec![intent("a"), done("a", 1), intent("b")],
        ))
        .unwrap();
        backend.mark_sent(&["b".into()]).unwrap();
    }
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(state.resources["a"].outputs, json!({"n": 1}));
    assert!(state.pending.contains_key("b"), "b was in flight");
}

#[test]
fn a_burst_of_writes_is_grouped_and_every_one_is_kept_in_order() {
    // Thousands of writes in flight at once: the writer groups them (and, once busy,
    // gathers before each fsync); each is acknowledged, none is lost or reordered, and a
    // write after a pause is acknowledged too.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        backend.load().unwrap();
        block_on(async {
            let acks: Vec<_> = (0..3000)
                .map(|i| backend.append(vec![done(&format!("r{}", i % 1000), i)]))
                .collect();
            for ack in acks {
                ack.await.unwrap().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
            append_durably(&backend, vec![done("last", -1)])
                .await
                .unwrap();
        });
    }
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(report.records, 3001);
    assert!(report.damaged.is_empty() && report.torn_tail.is_none());
    // Each address's last write wins: written in order, read back in order.
    for i in 0..1000 {
        assert_eq!(
            state.resources[format!("r{i}").as_str()].outputs,
            json!({"n": 2000 + i})
        );
    }
    assert_eq!(state.resources["last"].outputs, json!({"n": -1}));
}

#[test]
fn a_torn_or_damaged_journal_keeps_every_intact_record() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let mut text = String::new();
    for n in 0..3 {
        text.push_str(&String::from_utf8(encode(&done(&format!("r{n}"), n))).unwrap());
    }
    let damaged = String::from_utf8(encode(&done("bad", 9)))
        .unwrap()
        .replace("\"n\":9", "\"n\":8");
    text.push_str(&damaged);
    text.push_str(&String::from_utf8(encode(&done("r3", 3))).unwrap());
    text.push_str("0badc0de {\"done\":{\"addr"); // torn last line
    std::fs::write(&journal, &text).unwrap();
    // A read-only look sees every intact record and names the damage, and writes nothing.
    let (state, report) = read_only(dir.path()).unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(report.damaged, vec![4]);
    assert_eq!(report.torn_tail, Some(6));
    assert_eq!(
        state.resources.keys().cloned().collect::<Vec<_>>(),
        vec!["r0", "r1", "r2", "r3"]
    );
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), text);
    // A command that would write stops, and changes nothing.
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    match backend.load() {
        Err(StateError::Damaged { lines, .. }) => assert_eq!(lines, vec![4]),
        other => panic!("expected the damage to stop it: {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), text);
    // Repair, on the user's say-so: the damaged line is kept aside, byte for byte.
    let aside = backend
        .repair()
        .unwrap()
        .damaged_lines
        .expect("a file of damaged lines");
    assert_eq!(
        std::fs::read_to_string(&aside).unwrap(),
        format!("{damaged}0badc0de {{\"done\":{{\"addr\n"),
        "the damaged line and the torn one"
    );
    drop(backend);
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (again, report) = backend.load().unwrap();
    assert_eq!(report, LoadReport::default());
    assert_eq!(again, state);
}

#[test]
fn only_a_torn_last_line_is_repaired_without_asking() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let mut text = String::from_utf8(encode(&done("r0", 0))).unwrap();
    text.push_str("0badc0de {\"done\":{\"addr");
    std::fs::write(&journal, &text).unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(report.torn_tail, Some(2));
    assert_eq!(state.resources.len(), 1);
    drop(backend);
    assert_eq!(read_only(dir.path()).unwrap().1, LoadReport::default());
}

#[test]
fn a_permissive_state_left_by_an_older_capstan_is_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // As an older capstan left it: world-readable.
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("journal"), "").unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        state.join("journal"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut backend = DirectoryBackend::open(&state, Duration::ZERO).unwrap();
    let (mut s, _) = backend.load().unwrap();
    block_on(append_durably(&backend, vec![done("a", 1)])).unwrap();
    s.apply(&done("a", 1));
    backend.compact(&s).unwrap();
    check_owner(&state, "capstan.json", true).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    for name in ["journal", "snapshot.json", "lock", OWNER_FILE] {
        assert_eq!(mode(&state.join(name)), 0o600, "{name}");
    }
}

#[test]
fn a_record_cut_just_before_its_line_break_is_kept_and_ended() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let mut text = encode(&done("r0", 0));
    text.pop();
    std::fs::write(&journal, &text).unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert!(report.unterminated_tail && report.damaged.is_empty());
    assert_eq!(state.resources.len(), 1);
    block_on(append_durably(&backend, vec![done("r1", 1)])).unwrap();
    drop(backend);
    let (state, report) = read_only(dir.path()).unwrap();
    assert_eq!(state.resources.len(), 2, "both records, neither damaged");
    assert_eq!(
        report,
        LoadReport {
            records: 1,
            ..LoadReport::default()
        }
    );
}

#[test]
fn journals_keep_their_format_and_old_ones_still_read() {
    // Operations are a type now, written as the same words as before.
    let line = String::from_utf8(encode(&intent("a"))).unwrap();
    assert!(line.contains(r#""operation":"create""#), "{line}");
    // Older runs recorded an interrupted replace as "replace".
    let json = r#"{"failed":{"address":"a","operation":"replace","error":"interrupted"}}"#;
    let old = format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("journal"), format!("{line}{old}")).unwrap();
    let (state, report) = read_only(dir.path()).unwrap();
    assert_eq!(report.records, 2);
    assert!(report.damaged.is_empty());
    assert!(state.pending.is_empty(), "the failure settled the intent");
}

#[test]
fn times_are_written_as_rfc3339() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_795_963_487), "2026-11-29T14:44:47Z");
}

#[test]
fn garbage_of_any_kind_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    for n in 0..2000u32 {
        bytes.push((n.wrapping_mul(2654435761) >> 13) as u8);
    }
    std::fs::write(dir.path().join("journal"), &bytes).unwrap();
    let (state, report) = read_only(dir.path()).unwrap();
    assert!(state.resources.is_empty());
    assert!(!report.damaged.is_empty(), "{report:?}");
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    assert!(matches!(backend.load(), Err(StateError::Damaged { .. })));
    let aside = backend
        .repair()
        .unwrap()
        .damaged_lines
        .expect("damage set aside");
    // Byte for byte, even where the bytes are not text (line breaks are the separators).
    let mut expected = bytes.clone();
    if expected.last() != Some(&b'\n') {
        expected.push(b'\n');
    }
    let kept = std::fs::read(&aside).unwrap();
    let strip = |b: &[u8]| {
        b.iter()
            .copied()
            .filter(|c| *c != b'\n')
            .collect::<Vec<u8>>()
    };
    assert_eq!(strip(&kept), strip(&expected));
    assert!(backend.load().unwrap().0.resources.is_empty());
}

#[test]
fn a_second_holder_is_refused_with_the_first_ones_identity() {
    let dir = tempfile::tempdir().unwrap();
    let _first = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let second = DirectoryBackend::open(dir.path(), Duration::from_millis(100));
    let message = second.err().expect("locked").to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert!(message.contains("--lock-timeout"), "{message}");
}

#[test]
fn compaction_keeps_the_state_and_empties_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (mut state, _) = backend.load().unwrap();
    let records = vec![
        done("a", 1),
        done("b", 2),
        Record::Deleted {
            address: "a".into(),
        },
    ];
    block_on(append_durably(&backend, records.clone())).unwrap();
    for r in &records {
        state.apply(r);
    }
    backend.compact(&state).unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("journal")).unwrap().len(),
        0
    );
    drop(backend);
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    assert_eq!(backend.load().unwrap().0, state);
}

/// Another user's uid to give files to; `None` (skipped, or failed in CI) when this test
/// cannot, not being root.
fn other_uid() -> Option<u32> {
    if capstan_process::own_uid() != 0 {
        capstan_test_support::skip_or_fail("not root: cannot give a file to another user");
        return None;
    }
    Some(65534)
}

#[test]
fn a_lock_or_journal_that_is_a_link_is_refused_and_its_target_untouched() {
    for name in ["lock", "journal"] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, state.join(name)).unwrap();
        let opened = DirectoryBackend::open(&state, Duration::ZERO)
            .and_then(|mut backend| backend.load().map(drop));
        let message = opened.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("is a symbolic link"), "{name}: {message}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }
}

#[test]
fn temporary_files_left_as_links_are_replaced_not_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let mut backend = DirectoryBackend::open(&state, Duration::ZERO).unwrap();
    let (state_now, _) = backend.load().unwrap();
    for name in ["snapshot.json.tmp", "journal.tmp", "deployment.tmp"] {
        std::os::unix::fs::symlink(&victim, state.join(name)).unwrap();
    }
    backend.compact(&state_now).unwrap();
    check_owner(&state, "capstan.json", true).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(
        std::fs::read_to_string(state.join(OWNER_FILE)).unwrap(),
        "capstan.json\n"
    );
}

#[test]
fn a_dangling_claim_link_creates_nothing_where_it_points() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let target = dir.path().join("made-by-root");
    std::os::unix::fs::symlink(&target, state.join(OWNER_FILE)).unwrap();
    let claimed = check_owner(&state, "capstan.json", true);
    assert!(
        claimed
            .as_ref()
            .is_err_and(|e| e.to_string().contains("is a symbolic link")),
        "{claimed:?}"
    );
    assert!(!target.exists(), "nothing made through the link");
}

#[test]
fn a_state_directory_or_journal_of_another_user_is_refused() {
    let Some(other) = other_uid() else { return };
    // The directory itself.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(other), Some(other)).unwrap();
    let refused = DirectoryBackend::open(&state, Duration::ZERO).err();
    let message = refused.map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("belongs to"), "{message}");
    assert!(!state.join("lock").exists(), "nothing made in it");

    // A journal someone else owns in a directory of ours.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("journal"), "").unwrap();
    std::os::unix::fs::chown(state.join("journal"), Some(other), Some(other)).unwrap();
    let loaded = DirectoryBackend::open(&state, Duration::ZERO)
        .and_then(|mut backend| backend.load().map(drop));
    let message = loaded.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("journal") && message.contains("belongs to uid 65534")
            || message.contains("belongs to user"),
        "{message}"
    );
}

#[test]
fn a_state_restored_where_it_was_is_its_own_and_a_copy_elsewhere_is_not() {
    let top = tempfile::tempdir().unwrap();
    let state = top.path().join("state");
    std::fs::create_dir(&state).unwrap();
    check_owner(&state, "capstan.json", true).unwrap();
    let saved = top.path().join("saved");
    std::fs::rename(&state, &saved).unwrap();
    // Copied elsewhere: refused, naming where it came from.
    let elsewhere = top.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for name in [OWNER_FILE, LOCATION_FILE] {
        std::fs::copy(saved.join(name), elsewhere.join(name)).unwrap();
    }
    let refused = check_owner(&elsewhere, "capstan.json", false);
    assert!(
        matches!(&refused, Err(StateError::Copied { original, .. }) if original.ends_with("state")),
        "{refused:?}"
    );
    // Restored where it was (a new directory, the same path): its own.
    std::fs::create_dir(&state).unwrap();
    for name in [OWNER_FILE, LOCATION_FILE] {
        std::fs::copy(saved.join(name), state.join(name)).unwrap();
    }
    check_owner(&state, "capstan.json", true).unwrap();
}

#[test]
fn a_flipped_byte_in_the_snapshot_is_found_and_repair_rebuilds_it_from_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (mut state, _) = backend.load().unwrap();
    let append = |backend: &DirectoryBackend, state: &mut State, records: Vec<Record>| {
        block_on(append_durably(backend, records.clone())).unwrap();
        for r in &records {
            state.apply(r);
        }
    };
    append(&backend, &mut state, vec![done("a", 1), done("b", 2)]);
    backend.compact(&state).unwrap();
    append(&backend, &mut state, vec![done("c", 3)]);
    backend.compact(&state).unwrap();
    append(
        &backend,
        &mut state,
        vec![
            done("d", 4),
            Record::Deleted {
                address: "a".into(),
            },
        ],
    );
    drop(backend);

    // One byte changed on disk, inside a value: still JSON, another state.
    let snapshot = dir.path().join("snapshot.json");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    let changed = text.replacen("\"c\"", "\"x\"", 1);
    assert_ne!(text, changed);
    std::fs::write(&snapshot, changed).unwrap();
    let refused = read_only(dir.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(refused.contains("fails its checksum"), "{refused}");
    assert!(
        refused.contains("state repair"),
        "says what to do: {refused}"
    );

    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let repaired = backend.repair().unwrap();
    assert!(repaired.damaged_snapshot.is_some_and(|p| p.exists()));
    drop(backend);
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    assert_eq!(backend.load().unwrap().0, state, "every record is back");
}

#[test]
fn a_damaged_snapshot_with_nothing_to_rebuild_from_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("snapshot.json"),
        "{\"resources\": {}}\ncapstan-snapshot-crc32 00000000\n",
    )
    .unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let message = backend
        .repair()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains("no previous snapshot"), "{message}");
    assert!(dir.path().join("snapshot.json").exists(), "left as it was");
}

/// Journals intents for `addresses` in a run of its own, marks `sent` as sent, and ends as a
/// killed run would (nothing settled).
fn killed_run(dir: &Path, addresses: &[&str], sent: &[&str]) {
    let mut backend = DirectoryBackend::open(dir, Duration::ZERO).unwrap();
    backend.load().unwrap();
    let intents = addresses.iter().map(|a| intent(a)).collect();
    block_on(append_durably(&backend, intents)).unwrap();
    let sent: Vec<String> = sent.iter().map(|a| a.to_string()).collect();
    backend.mark_sent(&sent).unwrap();
}

fn pending_of(state: &State) -> Vec<&str> {
    state.pending.keys().map(String::as_str).collect()
}

#[test]
fn intents_journaled_ahead_and_never_sent_are_settled_by_the_next_load() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), &["x", "y", "z"], &["x", "z"]);
    {
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (state, report) = backend.load().unwrap();
        assert_eq!(pending_of(&state), ["x", "z"]);
        assert_eq!(report.never_sent, ["y"]);
    }
    // Settled for good: the next load (whose `sent` file is that run's) finds the same.
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(pending_of(&state), ["x", "z"]);
    assert!(report.never_sent.is_empty());
}

#[test]
fn a_sent_file_from_another_boot_or_run_proves_nothing() {
    // Another boot: the machine may have crashed, losing marks that were never synced.
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), &["x", "y"], &["x"]);
    let path = dir.path().join("sent");
    let text = std::fs::read_to_string(&path).unwrap();
    let (header, rest) = text.split_once('\n').unwrap();
    let (start, _boot) = header.rsplit_once(' ').unwrap();
    std::fs::write(
        &path,
        format!("{start} 00000000-0000-0000-0000-000000000000\n{rest}"),
    )
    .unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(pending_of(&state), ["x", "y"]);
    assert!(report.never_sent.is_empty());
    drop(backend);

    // An intent journaled by a capstan that kept no `sent` file (no run on it).
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), &[], &[]);
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("journal"))
        .unwrap();
    journal.write_all(&encode(&intent("old"))).unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, _) = backend.load().unwrap();
    assert_eq!(pending_of(&state), ["old"]);
}

#[test]
fn a_mark_cut_short_by_the_kill_counts_as_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), &["x", "y"], &["x"]);
    let mut sent = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("sent"))
        .unwrap();
    sent.write_all(b"\"y").unwrap();
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(pending_of(&state), ["x"]);
    assert_eq!(report.never_sent, ["y"]);
}

#[test]
fn an_intent_over_one_left_pending_earlier_is_never_settled_as_unsent() {
    let dir = tempfile::tempdir().unwrap();
    killed_run(dir.path(), &["x"], &["x"]);
    // The next run journals a new intent for `x` and is killed before sending it.
    killed_run(dir.path(), &["x"], &[]);
    let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(
        pending_of(&state),
        ["x"],
        "the first run's call may have run"
    );
    assert!(report.never_sent.is_empty());
}

#[test]
fn passwords_on_a_command_line_are_hidden() {
    assert_eq!(
        crate::scrub_command(
            "capstan apply --state postgres://alice:s3cret@db:5432/x?deployment=a --from=postgresql://bob:pw@h/y"
        ),
        "capstan apply --state postgres://alice:***@db:5432/x?deployment=a --from=postgresql://bob:***@h/y"
    );
    assert_eq!(
        crate::scrub_command("x --state postgres://h/db?password=pw&deployment=a"),
        "x --state postgres://h/db?password=***&deployment=a"
    );
    assert_eq!(
        crate::scrub_command("capstan apply --jobs 4"),
        "capstan apply --jobs 4"
    );
}

/// A snapshot now starts with its number of resources (the reader makes room for them at
/// once); one an older capstan wrote has none and reads the same, and a count no snapshot of
/// that size could hold reserves no more than the snapshot's bytes allow.
#[test]
fn snapshots_with_and_without_a_count_read_alike() {
    let dir = tempfile::tempdir().unwrap();
    let state = {
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (mut state, _) = backend.load().unwrap();
        let records: Vec<Record> = (0..3).map(|n| done(&format!("r{n}"), n)).collect();
        block_on(append_durably(&backend, records.clone())).unwrap();
        for record in &records {
            state.apply(record);
        }
        backend.compact(&state).unwrap();
        backend.load().unwrap().0
    };
    assert_eq!(state.resources.len(), 3);
    let snapshot = dir.path().join("snapshot.json");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    assert!(text.starts_with("{\"count\":3,\"resources\":{"), "{text}");
    let body = |state: &State| serde_json::to_string(state).unwrap();
    for written in [
        // As an older capstan wrote it: no count, no checksum.
        body(&state),
        // A count far beyond what the bytes could hold.
        body(&state).replacen('{', "{\"count\":1000000000000,", 1),
        // Fields in another order, and one this capstan does not know.
        format!(
            "{{\"pending\":{{}},\"future\":[1,2],\"resources\":{}}}",
            serde_json::to_string(&state.resources).unwrap()
        ),
    ] {
        std::fs::write(&snapshot, format!("{written}\n")).unwrap();
        let read = read_snapshot(&snapshot).unwrap();
        assert_eq!(read, state, "{written}");
    }
    std::fs::write(&snapshot, "{\"count\":1,\"pending\":{}}\n").unwrap();
    let message = read_snapshot(&snapshot).err().unwrap().to_string();
    assert!(message.contains("missing field `resources`"), "{message}");
}
