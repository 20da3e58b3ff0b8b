//! On a terminal, `destroy` (and an apply that would delete everything) asks first; `--yes`
//! skips the question, and without a terminal nobody is asked.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use crate::support::capstan_bin;

/// A pseudo-terminal: (the side we talk through, the side capstan gets as its terminal).
fn pty() -> (std::fs::File, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors, which we then own.
    let made = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(made, 0, "openpty");
    // SAFETY: fresh descriptors from openpty, owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
            "m": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}}"#,
    )
    .unwrap();
    let out = Command::new(capstan_bin())
        .arg("apply")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    dir
}

fn listed(dir: &std::path::Path) -> String {
    let out = Command::new(capstan_bin())
        .args(["state", "list"])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `args` on a terminal, answers `answer` when asked, and returns the exit code and
/// what the terminal showed.
fn on_terminal(dir: &std::path::Path, args: &[&str], answer: &str) -> (Option<i32>, String) {
    let (mut master, slave) = pty();
    let mut child = Command::new(capstan_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        // Ends with EIO once the child's side is closed.
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 || tx.send(buffer[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    while !seen.contains("Type `yes`") {
        let chunk = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no question asked; the terminal showed:\n{seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    master.write_all(answer.as_bytes()).unwrap();
    let status = child.wait().unwrap();
    while let Ok(chunk) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    (status.code(), seen)
}

#[test]
fn destroy_asks_on_a_terminal_and_anything_but_yes_deletes_nothing() {
    let dir = project();
    let (code, seen) = on_terminal(dir.path(), &["destroy"], "no\n");
    assert_eq!(code, Some(1), "{seen}");
    assert!(seen.contains("This deletes all 1 resource(s)"), "{seen}");
    assert!(seen.contains("Nothing was deleted."), "{seen}");
    assert_eq!(listed(dir.path()), "m\tlocal.memo\n");

    let (code, seen) = on_terminal(dir.path(), &["destroy"], "yes\n");
    assert_eq!(code, Some(0), "{seen}");
    assert_eq!(listed(dir.path()), "");
}

#[test]
fn an_apply_that_deletes_everything_asks_too_and_yes_skips_the_question() {
    let dir = project();
    std::fs::write(
        dir.path().join("capstan.json"),
        r#"{"providers": {"local": {"builtin": "local"}}, "resources": {}}"#,
    )
    .unwrap();
    let (code, seen) = on_terminal(dir.path(), &["apply"], "nope\n");
    assert_eq!(code, Some(1), "{seen}");
    assert_eq!(listed(dir.path()), "m\tlocal.memo\n");
    // --yes: no question, even on a terminal (no answer is ever written here: a question
    // would wait until the deadline below).
    let (master, slave) = pty();
    let child = Command::new(capstan_bin())
        .args(["apply", "--yes"])
        .current_dir(dir.path())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let out = crate::support::output_within(child, "apply --yes (waiting for an answer?)");
    drop(master);
    assert!(out.status.success());
    assert_eq!(listed(dir.path()), "");
}

#[test]
fn the_live_view_on_a_terminal_loses_no_line() {
    // The view gathers lines between redraws: every one of them must still reach the screen,
    // and the summary last.
    let dir = tempfile::tempdir().unwrap();
    let resources: serde_json::Map<String, serde_json::Value> = (0..300)
        .map(|i| {
            (
                format!("m{i:03}"),
                serde_json::json!({"provider": "local", "type": "memo", "inputs": {"value": i}}),
            )
        })
        .collect();
    std::fs::write(
        dir.path().join("capstan.json"),
        serde_json::json!({"providers": {"local": {"builtin": "local"}}, "resources": resources})
            .to_string(),
    )
    .unwrap();
    let (mut master, slave) = pty();
    let mut child = Command::new(capstan_bin())
        .arg("apply")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let collector = everything_shown(&master);
    assert!(child.wait().unwrap().success());
    let _ = master.flush();
    let seen = String::from_utf8_lossy(&collector.join().unwrap()).into_owned();
    let mut last = 0;
    for i in 0..300 {
        let line = format!("m{i:03}: created");
        let at = seen
            .find(&line)
            .unwrap_or_else(|| panic!("`{line}` never shown"));
        last = last.max(at);
    }
    assert!(
        seen.rfind("Done: 300 created").unwrap() > last,
        "the summary comes last"
    );
}

/// Everything the terminal shows, read from its `master` side until the other side is
/// closed (capstan, its only holder, exited: the read ends with EIO).
fn everything_shown(master: &std::fs::File) -> std::thread::JoinHandle<Vec<u8>> {
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buffer = [0u8; 65536];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buffer[..n]);
        }
        all
    })
}

/// A pseudo-terminal of `rows` × `cols`, as a terminal emulator would make it.
fn pty_sized(rows: u16, cols: u16) -> (std::fs::File, OwnedFd) {
    let (master, slave) = pty();
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    let set = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(set, 0, "TIOCSWINSZ");
    (master, slave)
}

#[test]
fn the_live_view_draws_what_runs_and_leaves_the_screen_as_a_log() {
    // What a person sees: while `slow` runs, a line for it under what has finished; at the
    // end, every finished resource once, the summary last, and no line of the block left.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        serde_json::json!({
            "providers": {"local": {"builtin": "local"}},
            "resources": {
                "slow": {"provider": "local", "type": "exec", "inputs": {
                    "command": "sh", "args": ["-c", "echo begin; sleep 1; echo end"]}},
                "q1": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
                "q2": {"provider": "local", "type": "memo", "inputs": {"value": 2}},
            }
        })
        .to_string(),
    )
    .unwrap();
    let (rows, cols) = (40, 100);
    let (mut master, slave) = pty_sized(rows, cols);
    let mut child = Command::new(capstan_bin())
        .args(["apply", "--color", "never"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let collector = everything_shown(&master);
    let watchdog = crate::support::Watchdog::new(&child, "apply on a terminal");
    let status = child.wait().unwrap();
    watchdog.finish();
    assert!(status.success());
    let _ = master.flush();
    let raw = collector.join().unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains("slow create"),
        "the running resource was drawn: {text:?}"
    );
    let nonzero = |n: u16| std::num::NonZeroU16::new(n).expect("a size");
    let mut terminal = vt100::Parser::new(nonzero(rows), nonzero(cols), 0);
    terminal.process(&raw);
    let screen = terminal.screen().contents();
    let shown: Vec<&str> = screen.lines().filter(|l| !l.trim().is_empty()).collect();
    for name in ["slow", "q1", "q2"] {
        let line = format!("{name}: created");
        assert_eq!(
            shown.iter().filter(|l| l.contains(&line)).count(),
            1,
            "`{line}` once on the screen:\n{screen}"
        );
    }
    assert!(
        !screen.contains("slow create"),
        "the block is gone at the end:\n{screen}"
    );
    assert!(
        shown
            .last()
            .is_some_and(|l| l.starts_with("Done: 3 created")),
        "the summary is the last line:\n{screen}"
    );
    assert!(
        screen.contains("slow │ begin") && screen.contains("slow │ end"),
        "the command's output stays above:\n{screen}"
    );
}
