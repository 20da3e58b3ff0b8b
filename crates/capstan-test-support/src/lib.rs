//! For Capstan's tests and benchmarks only, never a dependency of anything shipped: fetching
//! the software nobody here wrote that the tests run against ([`fetch`]), and the one rule for
//! a test whose tool or download is missing ([`skip_or_fail`]).

#![forbid(unsafe_code)]

pub mod fetch;
pub mod https;
pub mod machine;
pub mod postgres;

/// Whether this process runs as root (its real uid, from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// Whether this is a CI run (`CI=true` or `CI=1`, as CI services and `.ci/run` set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A test cannot run here (`message` says what is missing and how to install it): under CI
/// that is a failure; elsewhere the test says so loudly and the caller skips it.
pub fn skip_or_fail(message: &str) {
    assert!(!in_ci(), "{message} (under CI this is a failure)");
    eprintln!("\n=== SKIPPED: {message} ===\n");
}
