//! The PostgreSQL backend against a real server (Debian's `postgresql`, started per test).

use std::time::Duration;

use capstan_schema::{Json, OperationKind};
use capstan_state::{append_durably, Record, ResourceState, StateBackend, StateError};
use capstan_state_postgres::{history, read_only, state_at, Location, PgBackend};
use capstan_test_support::postgres::{self as pg, Postgres};

fn server() -> Option<Postgres> {
    if let Some(why) = pg::unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return None;
    }
    Some(Postgres::start())
}

fn location(pg: &Postgres, db: &str, name: &str) -> Location {
    Location::parse(&format!("{}&deployment={name}", pg.url(db))).unwrap()
}

fn intent(address: &str) -> Record {
    Record::Intent {
        address: address.into(),
        operation: OperationKind::Create,
        provider: "p".into(),
        resource_type: "t".into(),
        inputs: Json::from_value(&serde_json::json!({"n": 1})),
        time: 1,
        run: None,
        sensitive: vec![],
    }
}

fn done(address: &str, n: i64) -> Record {
    Record::Done {
        address: address.into(),
        state: ResourceState {
            provider: "p".into(),
            resource_type: "t".into(),
            inputs: Json::from_value(&serde_json::json!({"n": n})),
            outputs: Json::from_value(&serde_json::json!({})),
            dependencies: vec![],
            parent: None,
            sensitive: vec![],
            tainted: false,
        },
    }
}

fn open(location: &Location) -> Result<PgBackend, StateError> {
    PgBackend::open(location, Duration::ZERO, &mut |_| {})
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn records_survive_and_history_keeps_every_run() {
    let Some(pg) = server() else { return };
    pg.create_database("team");
    let web = location(&pg, "team", "web");
    let db = location(&pg, "team", "db");
    // Reading first writes nothing, not even the tables.
    assert!(read_only(&web, None).unwrap().state.resources.is_empty());
    assert_eq!(
        pg.psql(
            "team",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'capstan'"
        )
        .trim(),
        "0"
    );

    let run1 = {
        let mut backend = open(&web).unwrap();
        backend.load().unwrap();
        block(append_durably(&backend, vec![intent("a"), intent("b")])).unwrap();
        block(append_durably(&backend, vec![done("a", 1), done("b", 1)])).unwrap();
        backend.run()
    };
    {
        let mut backend = open(&web).unwrap();
        let (state, _) = backend.load().unwrap();
        assert_eq!(state.resources.len(), 2);
        block(append_durably(&backend, vec![intent("a"), done("a", 2)])).unwrap();
        block(append_durably(
            &backend,
            vec![Record::Deleted {
                address: "b".into(),
            }],
        ))
        .unwrap();
    }
    // Another deployment in the same database sees none of it.
    assert!(read_only(&db, None).unwrap().state.resources.is_empty());

    let now = read_only(&web, None).unwrap().state;
    assert_eq!(now.resources.len(), 1);
    assert_eq!(now.resources["a"].inputs.value()["n"], 2);
    let (then, _) = state_at(&web, run1, None).unwrap();
    assert_eq!(then.resources.len(), 2);
    assert_eq!(then.resources["a"].inputs.value()["n"], 1);

    let runs = history(&web).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].operations["create"], 2);
    assert_eq!(runs[1].deleted, 1);
    // Nothing was updated in place: every record is there.
    assert_eq!(
        pg.psql("team", "SELECT count(*) FROM capstan.records")
            .trim(),
        "7"
    );
    let e = state_at(&web, 999, None).unwrap_err().to_string();
    assert!(e.contains("no run 999"), "{e}");
}

#[test]
fn the_lock_names_its_holder_and_a_look_takes_none() {
    let Some(pg) = server() else { return };
    pg.create_database("team");
    let web = location(&pg, "team", "web");
    let mut first = open(&web).unwrap();
    first.load().unwrap();
    block(append_durably(&first, vec![intent("a")])).unwrap();
    first.mark_sent(&["a".to_string()]).unwrap();
    let e = open(&web).err().expect("the second is refused").to_string();
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    assert!(e.contains("database user capstan"), "{e}");
    // Another deployment is not locked by it.
    drop(open(&location(&pg, "team", "db")).unwrap());
    // A look while it runs: its operation is in flight, not settled.
    let look = read_only(&web, None).unwrap();
    assert!(look.running.is_some());
    assert!(look.state.pending.contains_key("a"));
    // Waiting: it gets the lock once the first lets go.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(first);
    });
    let mut told = None;
    let second = PgBackend::open(&web, Duration::from_secs(10), &mut |h| {
        told = Some(h.to_string())
    });
    releaser.join().unwrap();
    assert!(second.is_ok());
    assert!(told.unwrap().contains("pid"));
}

#[test]
fn intents_never_sent_are_settled_and_sent_ones_stay_pending() {
    let Some(pg) = server() else { return };
    pg.create_database("team");
    let web = location(&pg, "team", "web");
    {
        let mut backend = open(&web).unwrap();
        backend.load().unwrap();
        block(append_durably(
            &backend,
            vec![intent("sent"), intent("unsent")],
        ))
        .unwrap();
        backend.mark_sent(&["sent".to_string()]).unwrap();
    }
    let look = read_only(&web, None).unwrap();
    assert_eq!(look.report.never_sent, vec!["unsent".to_string()]);
    assert!(look.state.pending.contains_key("sent"));
    let mut backend = open(&web).unwrap();
    let (state, report) = backend.load().unwrap();
    assert_eq!(report.never_sent, vec!["unsent".to_string()]);
    assert_eq!(state.pending.keys().collect::<Vec<_>>(), ["sent"]);
    drop(backend);
    // Settled for good (recorded), not just left out.
    let look = read_only(&web, None).unwrap();
    assert!(look.report.never_sent.is_empty());
    assert_eq!(look.state.pending.len(), 1);
    // The marks of a run stay while it has anything pending, and go once it has not.
    let count = || {
        pg.psql("team", "SELECT count(*) FROM capstan.sent")
            .trim()
            .to_string()
    };
    assert_eq!(count(), "1");
    {
        let mut backend = open(&web).unwrap();
        backend.load().unwrap();
        let resolved = Record::Resolved {
            address: "sent".into(),
        };
        block(append_durably(&backend, vec![resolved])).unwrap();
    }
    assert_eq!(count(), "1");
    open(&web).unwrap().load().unwrap();
    assert_eq!(count(), "0");
}

#[test]
fn marks_written_before_a_server_crash_are_not_trusted() {
    let Some(mut pg) = server() else { return };
    pg.create_database("team");
    let web = location(&pg, "team", "web");
    {
        let mut backend = open(&web).unwrap();
        backend.load().unwrap();
        block(append_durably(&backend, vec![intent("a"), intent("b")])).unwrap();
        backend.mark_sent(&["a".to_string()]).unwrap();
        pg.stop_immediately();
        // The connection is gone: writing fails, and says so.
        let e = block(append_durably(&backend, vec![done("a", 1)])).unwrap_err();
        assert!(!e.to_string().is_empty());
        pg.start_again();
    }
    // The intents are durable; the marks may not be, so both stay pending.
    let mut backend = open(&web).unwrap();
    let (state, report) = backend.load().unwrap();
    assert!(report.never_sent.is_empty());
    assert_eq!(state.pending.len(), 2);
}

#[test]
fn foreign_newer_and_unreachable_databases_are_refused_without_writing() {
    let Some(pg) = server() else { return };
    pg.create_database("other");
    pg.psql(
        "other",
        "CREATE SCHEMA capstan; CREATE TABLE capstan.things (x int)",
    );
    let e = open(&location(&pg, "other", "web"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not Capstan's"), "{e}");
    assert_eq!(
        pg.psql(
            "other",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'capstan'"
        )
        .trim(),
        "1"
    );
    let e = read_only(&location(&pg, "other", "web"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not Capstan's"), "{e}");

    pg.create_database("newer");
    let newer = location(&pg, "newer", "web");
    drop(open(&newer).unwrap());
    pg.psql(
        "newer",
        "UPDATE capstan.meta SET value = '99' WHERE key = 'schema_version'",
    );
    let before = pg.psql("newer", "SELECT count(*) FROM capstan.runs");
    let e = open(&newer).err().unwrap().to_string();
    assert!(
        e.contains("schema version 99") && e.contains("newer Capstan"),
        "{e}"
    );
    assert_eq!(
        pg.psql("newer", "SELECT count(*) FROM capstan.runs"),
        before
    );

    let e = open(&location(&pg, "missing", "web"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot connect") && e.contains("missing"), "{e}");
}

#[test]
fn a_wrong_password_is_refused_and_never_shown() {
    if let Some(why) = pg::unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return;
    }
    let pg = Postgres::start_with(Some("right-horse"));
    let url = pg
        .url("postgres")
        .replacen("capstan@", "capstan:wrong-battery@", 1);
    let wrong = Location::parse(&format!("{url}&deployment=web")).unwrap();
    let e = open(&wrong).err().unwrap().to_string();
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong-battery"), "{e}");
    let url = pg
        .url("postgres")
        .replacen("capstan@", "capstan:right-horse@", 1);
    let right = Location::parse(&format!("{url}&deployment=web")).unwrap();
    assert!(!right.to_string().contains("right-horse"));
    let mut backend = open(&right).unwrap();
    backend.load().unwrap();
    drop(backend);
    // The holder recorded for the run hides a password its command line carried.
    let holders = pg.psql("postgres", "SELECT holder::text FROM capstan.runs");
    assert!(!holders.contains("right-horse"));
}

#[test]
fn tables_of_an_older_capstan_are_read_as_they_are_and_migrated_by_a_writer() {
    let Some(pg) = server() else { return };
    pg.create_database("team");
    let web = location(&pg, "team", "web");
    {
        let mut backend = open(&web).unwrap();
        backend.load().unwrap();
        block(append_durably(&backend, vec![intent("a"), done("a", 1)])).unwrap();
    }
    // As schema version 1 left them: no table of keys.
    pg.psql(
        "team",
        "DROP TABLE capstan.keys, capstan.alive; UPDATE capstan.meta SET value = '1' WHERE key = 'schema_version'",
    );
    let before = pg
        .dump("team")
        .lines()
        .filter(|l| !l.contains("restrict "))
        .count();
    assert_eq!(read_only(&web, None).unwrap().state.resources.len(), 1);
    let after = pg
        .dump("team")
        .lines()
        .filter(|l| !l.contains("restrict "))
        .count();
    assert_eq!(before, after, "a look migrated");
    let mut backend = open(&web).unwrap();
    assert_eq!(backend.load().unwrap().0.resources.len(), 1);
    drop(backend);
    let version = pg.psql(
        "team",
        "SELECT value FROM capstan.meta WHERE key = 'schema_version'",
    );
    assert_eq!(
        version.trim(),
        capstan_state_postgres::SCHEMA_VERSION.to_string()
    );
    assert_eq!(
        pg.psql("team", "SELECT to_regclass('capstan.keys') IS NOT NULL")
            .trim(),
        "t"
    );
}

/// A run whose lock connection was cut while its marks connection lives may still send: a
/// later run does not settle its intents until that connection is gone too.
#[test]
fn a_run_that_lost_its_lock_but_may_still_send_is_not_settled() {
    let Some(pg) = server() else { return };
    pg.create_database("team");
    let web = location(&pg, "team", "web");
    let mut first = open(&web).unwrap();
    first.load().unwrap();
    block(append_durably(&first, vec![intent("a")])).unwrap();
    // Its main connection (the deployment's lock) is cut; its marks connection is not.
    pg.psql(
        "team",
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' \
         AND l.granted AND l.objsubid = 2 AND l.classid = 1128353875",
    );
    let mut second = loop {
        match open(&web) {
            Ok(backend) => break backend,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let (state, report) = second.load().unwrap();
    assert!(report.never_sent.is_empty(), "{report:?}");
    assert!(state.pending.contains_key("a"));
    drop(second);
    drop(first);
    // Gone for good: what it never marked was never sent.
    let mut third = open(&web).unwrap();
    let (state, report) = third.load().unwrap();
    assert_eq!(report.never_sent, vec!["a".to_string()]);
    assert!(state.pending.is_empty());
}

/// A crash of one server process makes the server recover (the postmaster itself stays, so its
/// start time does not change): marks committed without waiting for the disk may be gone, and
/// nothing of the runs before is trusted.
#[test]
fn marks_from_before_a_crash_recovery_are_not_trusted() {
    let Some(pg) = server() else { return };
    pg.create_database("team");
    let web = location(&pg, "team", "web");
    {
        let mut backend = open(&web).unwrap();
        backend.load().unwrap();
        block(append_durably(
            &backend,
            vec![intent("sent"), intent("unsent")],
        ))
        .unwrap();
        backend.mark_sent(&["sent".to_string()]).unwrap();
    }
    pg.crash_one_backend();
    let mut backend = open(&web).unwrap();
    let (state, report) = backend.load().unwrap();
    assert!(report.never_sent.is_empty(), "{report:?}");
    assert_eq!(state.pending.len(), 2);
}
