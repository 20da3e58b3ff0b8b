//! The bad-input corpus: every input that once made Capstan panic, hang, take a typo as data or
//! say something misleading, kept as a case that checks the exact message a user sees
//! (snapshots under `tests/cli/snapshots/`, reviewed like code), the exit code, and that the state
//! is byte for byte what it was whenever nothing should have run.
//!
//! To add a case, add it to `CASES` and run `INSTA_UPDATE=always cargo test -p capstan-cli
//! --test corpus`, then read the new snapshot before committing it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::support::{capstan_bin, testing_provider};

struct Case {
    name: &'static str,
    /// Files written before `setup` runs (`{TESTING}` stands for the testing provider).
    before: &'static [(&'static str, &'static str)],
    /// Commands run first to make a state (each must succeed).
    setup: &'static [&'static [&'static str]],
    /// Files written after `setup`, before the case's command.
    files: &'static [(&'static str, &'static str)],
    /// `capstan.json`, written with `files`.
    deployment: Option<String>,
    /// The command, run in the case's directory.
    args: &'static [&'static str],
    /// The exit code it must end with.
    code: i32,
    /// Whether the state directory must be unchanged (or still absent) afterwards.
    state_untouched: bool,
}

const LOCAL: &str = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {}}"#;

/// Shorthand for a case whose only file is `capstan.json` and which changes nothing.
fn bad(
    name: &'static str,
    deployment: impl Into<String>,
    args: &'static [&'static str],
    code: i32,
) -> Case {
    Case {
        name,
        before: &[],
        setup: &[],
        files: &[],
        deployment: Some(deployment.into()),
        args,
        code,
        state_untouched: true,
    }
}

const APPLY: &[&str] = &["apply"];
const PLAN: &[&str] = &["plan"];

/// Groups nested `depth` deep, a memo at the bottom.
fn deep_groups(depth: usize) -> String {
    let mut text = String::from(r#"{"providers": {"local": {"builtin": "local"}}, "resources": "#);
    for i in 0..depth {
        text.push_str(&format!(r#"{{"g{i}": {{"resources": "#));
    }
    text.push_str(r#"{"m": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}"#);
    text.push_str(&"}}".repeat(depth));
    text.push('}');
    text
}

/// One memo, nothing to give it.
const MEMO_PLAIN: &str = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "m": {"provider": "local", "type": "memo", "inputs": {"value": "hi"}}
}}"#;

/// `m` takes the parameter `greeting`.
const MEMO_WITH_PARAM: &str = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "m": {"provider": "local", "type": "memo", "inputs": {"value": {"$param": "greeting"}}}
}}"#;

/// `exec`s whose stdout has no final newline, and Windows line endings.
const EXEC_PRINTF: &str = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "port": {"provider": "local", "type": "exec", "inputs": {"command": "printf", "args": ["8080"]}},
  "crlf": {"provider": "local", "type": "exec", "inputs": {"command": "printf", "args": ["a\r\nb\r\n"]}}
}}"#;

/// `m` refers to `x`.
const MEMO_WITH_REF: &str = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "x": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
  "m": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "x#value"}}}
}}"#;

/// A deployment of one `memo` resource `m` (and `x`, which it may refer to) with `inputs`.
fn memo(inputs: &str) -> String {
    format!(
        r#"{{"providers": {{"local": {{"builtin": "local"}}}}, "resources": {{
  "x": {{"provider": "local", "type": "memo", "inputs": {{"value": 1}}}},
  "m": {{"provider": "local", "type": "memo", "inputs": {inputs}}}
}}}}"#
    )
}

fn cases() -> Vec<Case> {
    vec![
        // ---- flags: numbers of seconds, jobs, colour (usage errors, exit 2) ----
        bad("timeout_negative", LOCAL, &["apply", "--timeout=-1"], 2),
        bad("timeout_inf", LOCAL, &["apply", "--timeout", "inf"], 2),
        bad("timeout_nan", LOCAL, &["apply", "--timeout", "NaN"], 2),
        bad("timeout_huge", LOCAL, &["apply", "--timeout", "1e300"], 2),
        bad("timeout_zero", LOCAL, &["apply", "--timeout", "0"], 2),
        bad("timeout_below_a_millisecond", LOCAL, &["apply", "--timeout", "1e-10"], 2),
        bad("timeout_words", LOCAL, &["apply", "--timeout", "ten"], 2),
        // ---- --target: a typo selects nothing; an empty pattern; tags that are not a list ----
        bad("target_typo", LOCAL, &["apply", "--target", "wbe"], 2),
        bad("target_empty", LOCAL, &["plan", "--target", ""], 2),
        bad("target_bare_at", LOCAL, &["plan", "--target", "@"], 2),
        bad(
            "tags_not_a_list",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {"a": {"provider": "local", "type": "memo", "tags": "web"}}}"#,
            PLAN,
            2,
        ),
        bad(
            "tags_with_space",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {"a": {"provider": "local", "type": "memo", "tags": ["a b"]}}}"#,
            PLAN,
            2,
        ),
        // ---- machines: what the operation would refuse, refused by the plan ----
        bad(
            "machine_target_no_host",
            r#"{"providers": {"m": {"builtin": "machine"}}, "resources": {"web": {"provider": "m", "type": "nixos", "inputs": {"target": "root@", "hostKey": "ssh-ed25519 AAAA", "system": "/nix/store/x-system"}}}}"#,
            PLAN,
            1,
        ),
        bad(
            "machine_ca_file_on_http",
            r#"{"providers": {"m": {"builtin": "machine"}}, "resources": {"web": {"provider": "m", "type": "nixos", "inputs": {"target": "web", "hostKey": "ssh-ed25519 AAAA", "system": "/nix/store/x-system", "checks": [{"http": "http://web/", "caFile": "/etc/hostname"}]}}}}"#,
            PLAN,
            1,
        ),
        bad(
            "lock_timeout_inf",
            LOCAL,
            &["plan", "--lock-timeout", "inf"],
            2,
        ),
        bad("jobs_zero", LOCAL, &["apply", "-j", "0"], 2),
        bad("jobs_negative", LOCAL, &["apply", "-j", "-3"], 2),
        bad("color_typo", LOCAL, &["plan", "--color", "maybe"], 2),
        bad(
            "provider_timeout_huge",
            r#"{"providers": {"local": {"builtin": "local", "timeout": 1e300}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "provider_timeout_negative",
            r#"{"providers": {"local": {"builtin": "local", "timeout": -5}}, "resources": {}}"#,
            APPLY,
            2,
        ),
        bad(
            "provider_timeout_string",
            r#"{"providers": {"local": {"builtin": "local", "timeout": "10s"}}, "resources": {}}"#,
            APPLY,
            2,
        ),
        bad(
            "max_message_zero",
            LOCAL,
            &["apply", "--max-message-mib", "0"],
            2,
        ),
        bad(
            "provider_max_message_too_large",
            r#"{"providers": {"local": {"builtin": "local", "maxMessageMiB": 5000}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        // ---- typos are errors, never data ----
        bad(
            "marker_typo",
            memo(r#"{"value": {"$reff": "x#value"}}"#),
            PLAN,
            2,
        ),
        bad(
            "marker_ref_number",
            memo(r#"{"value": {"$ref": 42}}"#),
            PLAN,
            2,
        ),
        bad(
            "marker_ref_extra_key",
            memo(r#"{"value": {"$ref": "x#value", "extra": 1}}"#),
            PLAN,
            2,
        ),
        bad(
            "marker_param_number",
            memo(r#"{"value": {"$param": 5}}"#),
            PLAN,
            2,
        ),
        bad(
            "marker_cap_in_array",
            memo(r#"{"value": [{"$cap": "x#handle"}]}"#),
            PLAN,
            2,
        ),
        bad("marker_as_inputs", memo(r#"{"$ref": "x#value"}"#), PLAN, 2),
        // Issue 20: a builtin nobody has, `args` where nothing reads them, names that collide
        // with children's or look like others.
        bad(
            "builtin_unknown",
            r#"{"providers": {"l": {"builtin": "lokal"}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "builtin_terraform",
            r#"{"providers": {"l": {"builtin": "terraform"}}, "resources": {}}"#,
            APPLY,
            2,
        ),
        // Issue 20 item 22: who serves a socket is named right, or refused.
        bad(
            "owner_without_a_socket",
            r#"{"providers": {"l": {"builtin": "local", "owner": "root"}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "owner_no_such_user",
            r#"{"providers": {"s": {"socket": "s.sock", "owner": "no-such-user-here"}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "owner_negative",
            r#"{"providers": {"s": {"socket": "s.sock", "owner": -1}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "owner_a_list",
            r#"{"providers": {"s": {"socket": "s.sock", "owner": ["root"]}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "args_on_a_builtin",
            r#"{"providers": {"l": {"builtin": "local", "args": ["-v"]}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "args_on_a_terraform_provider",
            r#"{"providers": {"t": {"executable": "./tf", "protocol": "terraform", "args": ["-v"]}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "name_with_a_slash",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {"a/b": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}}"#,
            PLAN,
            2,
        ),
        bad(
            "name_with_a_zero_width_space",
            "{\"providers\": {\"local\": {\"builtin\": \"local\"}}, \"resources\": {\"a\u{200B}b\": {\"provider\": \"local\", \"type\": \"memo\", \"inputs\": {\"value\": 1}}}}",
            PLAN,
            2,
        ),
        bad(
            "name_with_a_bidi_override",
            "{\"providers\": {\"local\": {\"builtin\": \"local\"}}, \"resources\": {\"ab\u{202E}c\": {\"provider\": \"local\", \"type\": \"memo\", \"inputs\": {\"value\": 1}}}}",
            PLAN,
            2,
        ),
        bad(
            "marker_unknown_nested",
            memo(r#"{"value": {"config": {"$schema": "x"}}}"#),
            PLAN,
            2,
        ),
        bad(
            "marker_ref_malformed",
            memo(r#"{"value": {"$ref": "x.value"}}"#),
            PLAN,
            2,
        ),
        bad(
            "duplicate_resource",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "a": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
  "a": {"provider": "local", "type": "memo", "inputs": {"value": 2}}
}}"#,
            PLAN,
            2,
        ),
        bad(
            "duplicate_input",
            memo(r#"{"value": 1, "value": 2}"#),
            PLAN,
            2,
        ),
        bad(
            "duplicate_provider_key",
            r#"{"providers": {"local": {"builtin": "local", "builtin": "nix"}}, "resources": {}}"#,
            PLAN,
            2,
        ),
        bad(
            "duplicate_top_level",
            r#"{"providers": {}, "resources": {}, "resources": {}}"#,
            PLAN,
            2,
        ),
        Case {
            name: "duplicate_param",
            files: &[("params.json", r#"{"greeting": "hi", "greeting": "hello"}"#)],
            ..bad(
                "",
                memo(r#"{"value": {"$param": "greeting"}}"#),
                &["plan", "--params", "params.json"],
                2,
            )
        },
        Case {
            name: "param_uses_param",
            files: &[(
                "params.json",
                r#"{"greeting": {"$param": "other"}, "other": 1}"#,
            )],
            ..bad(
                "",
                memo(r#"{"value": {"$param": "greeting"}}"#),
                &["plan", "--params", "params.json"],
                2,
            )
        },
        // ---- names and messages ----
        bad(
            "name_with_escape",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "evil\u001b[31mred": {"provider": "local", "type": "memo"}
}}"#,
            PLAN,
            2,
        ),
        bad(
            "name_with_newline",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "two\nlines": {"provider": "local", "type": "memo"}
}}"#,
            PLAN,
            2,
        ),
        bad(
            "type_not_a_string",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "a": {"provider": "local", "type": 5}
}}"#,
            PLAN,
            2,
        ),
        bad(
            "ref_to_a_group",
            r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "web": {"resources": {"db": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}},
  "m": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "web#value"}}}
}}"#,
            PLAN,
            2,
        ),
        bad(
            "deep_nesting",
            memo(&format!(
                r#"{{"value": {}1{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            )),
            PLAN,
            2,
        ),
        bad("inputs_not_an_object", memo(r#"[1, 2]"#), PLAN, 2),
        // Issue 20: a parameter file's syntax error says where; a byte-order mark is skipped.
        Case {
            name: "params_syntax_error_says_where",
            files: &[("p.json", "{\n  \"greeting\": \"hi\",\n  \"b\": \n}")],
            ..bad("", MEMO_WITH_PARAM, &["plan", "--params", "p.json"], 2)
        },
        // A path that never ends (a device, a FIFO fed forever) is an error, not all memory.
        bad(
            "params_that_never_end",
            MEMO_WITH_PARAM,
            &["plan", "--params", "/dev/zero"],
            2,
        ),
        bad(
            "secrets_that_never_end",
            MEMO_WITH_PARAM,
            &["plan", "--secrets", "/dev/zero"],
            2,
        ),
        Case {
            name: "params_with_a_byte_order_mark",
            files: &[("p.json", "\u{FEFF}{\"greeting\": \"hi\"}")],
            ..bad("", MEMO_WITH_PARAM, &["plan", "--params", "p.json"], 0)
        },
        // Issue 20: a file resource inside the state directory wiped the journal and reported
        // success; it is refused, and the state is as it was.
        Case {
            name: "file_inside_the_state_directory",
            state_untouched: false,
            ..bad(
                "",
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "oops": {"provider": "local", "type": "file", "inputs": {"path": ".capstan/journal", "content": "x"}}
}}"#,
                APPLY,
                1,
            )
        },
        // Issue 20: the advice a large read gives (--max-message-mib) is taken by plan too.
        Case {
            name: "plan_takes_max_message_mib",
            ..bad("", LOCAL, &["plan", "--max-message-mib", "64"], 0)
        },
        // Issue 20: groups nested 5,000 deep overflowed the stack (exit 134).
        bad("groups_nested_too_deep", deep_groups(5_000), PLAN, 2),
        // Issue 20: a claim a full disk left empty claims nothing; the apply goes on.
        Case {
            name: "empty_claim_left_by_a_full_disk",
            files: &[(".capstan/deployment", "")],
            state_untouched: false,
            ..bad("", MEMO_PLAIN, &["apply"], 0)
        },
        // ---- state commands need only the state, and never write ----
        Case {
            name: "state_list_without_the_deployment",
            before: &[
                ("d.json", MEMO_WITH_PARAM),
                ("p.json", r#"{"greeting": "hi"}"#),
            ],
            setup: &[&["apply", "-f", "d.json", "--params", "p.json"]],
            ..bad("", "", &["state", "list", "-f", "capstan.json"], 0)
        },
        Case {
            name: "state_list_with_an_invalid_deployment",
            before: &[
                ("capstan.json", MEMO_WITH_PARAM),
                ("p.json", r#"{"greeting": "hi"}"#),
            ],
            setup: &[&["apply", "--params", "p.json"]],
            ..bad("", "{ not json", &["state", "list"], 0)
        },
        Case {
            name: "state_show_without_params",
            before: &[
                ("capstan.json", MEMO_WITH_PARAM),
                ("p.json", r#"{"greeting": "hi"}"#),
            ],
            setup: &[&["apply", "--params", "p.json"]],
            ..bad("", MEMO_WITH_PARAM, &["state", "show", "m"], 0)
        },
        Case {
            name: "state_list_json",
            before: &[
                ("capstan.json", MEMO_WITH_PARAM),
                ("p.json", r#"{"greeting": "hi"}"#),
            ],
            setup: &[&["apply", "--params", "p.json"]],
            ..bad("", MEMO_WITH_PARAM, &["state", "list", "--json"], 0)
        },
        Case {
            name: "state_list_where_nothing_was_applied",
            ..bad("", LOCAL, &["state", "list"], 0)
        },
        // ---- --state: a directory or a postgres:// URL, nothing else ----
        Case {
            name: "state_url_without_a_deployment_name",
            ..bad(
                "",
                LOCAL,
                &["apply", "--state", "postgres://alice:hunter2@db.invalid/infra"],
                2,
            )
        },
        Case {
            name: "state_url_of_another_kind",
            ..bad("", LOCAL, &["plan", "--state", "s3://bucket/state"], 2)
        },
        Case {
            name: "state_declared_not_a_string",
            ..bad(
                "",
                r#"{"state": 5, "providers": {"local": {"builtin": "local"}}, "resources": {}}"#,
                PLAN,
                2,
            )
        },
        Case {
            name: "state_declared_of_another_kind",
            ..bad(
                "",
                r#"{"state": "s3://bucket/x", "providers": {"local": {"builtin": "local"}}, "resources": {}}"#,
                &["state", "list"],
                2,
            )
        },
        Case {
            name: "state_url_mistyped",
            ..bad("", LOCAL, &["apply", "--state", "postgres:/infra?deployment=web"], 2)
        },
        Case {
            name: "state_empty",
            ..bad("", LOCAL, &["state", "list", "--state", ""], 2)
        },
        Case {
            name: "state_url_libpq_refuses",
            ..bad(
                "",
                LOCAL,
                &["state", "list", "--state", "postgres://db/x?deployment=a&colour=blue"],
                2,
            )
        },
        Case {
            name: "state_url_unreachable",
            ..bad(
                "",
                LOCAL,
                &[
                    "plan",
                    "--state",
                    "postgres://nobody:pw@/x?host=/nonexistent&deployment=a",
                ],
                2,
            )
        },
        Case {
            name: "plan_writes_no_state",
            ..bad("", memo(r#"{"value": 2}"#), PLAN, 0)
        },
        Case {
            name: "plan_detailed_exitcode_changes",
            ..bad(
                "",
                memo(r#"{"value": 2}"#),
                &["plan", "--detailed-exitcode"],
                2,
            )
        },
        Case {
            name: "plan_detailed_exitcode_nothing_to_do",
            before: &[("capstan.json", LOCAL)],
            setup: &[&["apply"]],
            ..bad("", LOCAL, &["plan", "--detailed-exitcode"], 0)
        },
        Case {
            name: "plan_detailed_exitcode_error",
            ..bad(
                "",
                memo(r#"{"value": {"$reff": 1}}"#),
                &["plan", "--detailed-exitcode"],
                1,
            )
        },
        Case {
            name: "plan_detailed_exitcode_usage_error",
            ..bad("", LOCAL, &["plan", "--detailed-exitcode", "--bogus"], 1)
        },
        Case {
            name: "destroy_needs_no_params",
            before: &[
                ("capstan.json", MEMO_WITH_PARAM),
                ("p.json", r#"{"greeting": "hi"}"#),
            ],
            setup: &[&["apply", "--params", "p.json"]],
            state_untouched: false,
            ..bad("", MEMO_WITH_PARAM, &["destroy"], 0)
        },
        Case {
            name: "destroy_without_the_deployment",
            before: &[
                ("d.json", MEMO_WITH_PARAM),
                ("p.json", r#"{"greeting": "hi"}"#),
            ],
            setup: &[&["apply", "-f", "d.json", "--params", "p.json"]],
            ..bad("", "", &["destroy", "-f", "capstan.json"], 2)
        },
        Case {
            name: "forget_warns_about_dependents",
            before: &[("capstan.json", MEMO_WITH_REF)],
            setup: &[&["apply"]],
            state_untouched: false,
            ..bad("", MEMO_WITH_REF, &["state", "forget", "x"], 0)
        },
        // ---- exec: stdout byte for byte; clear errors ----
        Case {
            name: "exec_stdout_is_byte_exact",
            before: &[("capstan.json", EXEC_PRINTF)],
            setup: &[&["apply"]],
            ..bad("", EXEC_PRINTF, &["state", "show", "port"], 0)
        },
        Case {
            name: "exec_stdout_keeps_crlf",
            before: &[("capstan.json", EXEC_PRINTF)],
            setup: &[&["apply"]],
            ..bad("", EXEC_PRINTF, &["state", "show", "crlf"], 0)
        },
        Case {
            name: "exec_stdout_not_utf8",
            state_untouched: false,
            ..bad(
                "",
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "bin": {"provider": "local", "type": "exec", "inputs": {"command": "printf", "args": ["ok\\377"]}}
}}"#,
                APPLY,
                1,
            )
        },
        Case {
            name: "exec_bad_cwd",
            state_untouched: false,
            ..bad(
                "",
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "t": {"provider": "local", "type": "exec", "inputs": {"command": "true", "cwd": "no/such/dir"}}
}}"#,
                APPLY,
                1,
            )
        },
        Case {
            name: "exec_no_such_program",
            state_untouched: false,
            ..bad(
                "",
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "t": {"provider": "local", "type": "exec", "inputs": {"command": "no-such-program-capstan"}}
}}"#,
                APPLY,
                1,
            )
        },
        // ---- several resources, some not done: listed again under the summary ----
        Case {
            name: "failures_listed_under_the_summary",
            state_untouched: false,
            ..bad(
                "",
                // No resource that succeeds beside them: its line raced with theirs (a
                // success is shown once its record is durable, a start at once), and the
                // snapshot then failed one run in a few under load.
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "web1": {"provider": "local", "type": "exec", "inputs": {"command": "no-such-program-capstan"}},
  "after": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "web1#stdout"}}}
}}"#,
                &["apply", "-j", "1"],
                1,
            )
        },
        // ---- two deployments in one directory never share a state ----
        Case {
            name: "second_deployment_refused_by_apply",
            before: &[("capstan.json", MEMO_WITH_REF)],
            setup: &[&["apply"]],
            files: &[("other.json", LOCAL)],
            ..bad("", MEMO_WITH_REF, &["apply", "-f", "other.json"], 2)
        },
        Case {
            name: "second_deployment_refused_by_plan",
            before: &[("capstan.json", MEMO_WITH_REF)],
            setup: &[&["apply"]],
            files: &[("other.json", LOCAL)],
            ..bad("", MEMO_WITH_REF, &["plan", "-f", "other.json"], 2)
        },
        Case {
            name: "second_deployment_with_its_own_state",
            before: &[("capstan.json", MEMO_WITH_REF)],
            setup: &[&["apply"]],
            files: &[("other.json", LOCAL)],
            ..bad(
                "",
                MEMO_WITH_REF,
                &["plan", "-f", "other.json", "--state", ".capstan-other"],
                0,
            )
        },
        Case {
            name: "provider_type_error_names_the_field",
            state_untouched: false,
            ..bad(
                "",
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "f": {"provider": "local", "type": "exec", "inputs": {"command": "true", "env": {"PORT": 8080}}}
}}"#,
                APPLY,
                1,
            )
        },
        Case {
            name: "state_dir_is_a_file",
            files: &[("not-a-dir", "x")],
            ..bad("", LOCAL, &["apply", "--state", "not-a-dir"], 2)
        },
        Case {
            name: "state_list_state_dir_is_a_file",
            files: &[("not-a-dir", "x")],
            ..bad("", LOCAL, &["state", "list", "--state", "not-a-dir"], 2)
        },
        bad(
            "provider_call_inputs_not_an_object",
            LOCAL,
            &[
                "provider", "call", "local", "--type", "memo", "--inputs", "[1]",
            ],
            2,
        ),
        bad(
            "provider_call_inputs_duplicate_key",
            LOCAL,
            &[
                "provider",
                "call",
                "local",
                "--type",
                "memo",
                "--inputs",
                r#"{"value": 1, "value": 2}"#,
            ],
            2,
        ),
        bad(
            "provider_socket_missing",
            LOCAL,
            &["provider", "describe", "--socket", "no/such.sock"],
            2,
        ),
        // ---- built-in providers are discoverable ----
        bad(
            "provider_describe_builtin_typo",
            LOCAL,
            &["provider", "describe", "lcoal"],
            2,
        ),
        Case {
            name: "provider_call_builtin",
            ..bad(
                "",
                LOCAL,
                &[
                    "provider",
                    "call",
                    "local",
                    "--type",
                    "memo",
                    "--inputs",
                    r#"{"value": [1, "two"]}"#,
                ],
                0,
            )
        },
        // ---- a damaged journal ----
        Case {
            name: "damaged_journal_stops_apply",
            files: &[(
                ".capstan/journal",
                "0badc0de {\"done\": 1}\nnot a record at all\n",
            )],
            ..bad("", LOCAL, APPLY, 2)
        },
        // Issue 20: a plan writes nothing, so a damaged journal does not stop it; it says so.
        Case {
            name: "damaged_journal_plan_warns_and_plans",
            files: &[(
                ".capstan/journal",
                "0badc0de {\"done\": 1}\nnot a record at all\n",
            )],
            ..bad("", LOCAL, PLAN, 0)
        },
        Case {
            name: "damaged_journal_state_list_warns",
            files: &[(
                ".capstan/journal",
                "0badc0de {\"done\": 1}\nnot a record at all\n",
            )],
            ..bad("", LOCAL, &["state", "list"], 0)
        },
        Case {
            name: "damaged_journal_repaired_on_request",
            files: &[(
                ".capstan/journal",
                "0badc0de {\"done\": 1}\nnot a record at all\n",
            )],
            state_untouched: false,
            ..bad("", LOCAL, &["state", "repair"], 0)
        },
        // Issue 20 item 18: a file with no path, or a directory's, is said as such.
        Case {
            name: "file_with_an_empty_path",
            deployment: Some(
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "f": {"provider": "local", "type": "file", "inputs": {"path": "", "content": "x"}}}}"#
                    .into(),
            ),
            state_untouched: false,
            ..bad("", LOCAL, APPLY, 1)
        },
        Case {
            name: "file_with_a_directory_path",
            deployment: Some(
                r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
  "f": {"provider": "local", "type": "file", "inputs": {"path": "sub/", "content": "x"}}}}"#
                    .into(),
            ),
            state_untouched: false,
            ..bad("", LOCAL, APPLY, 1)
        },
        // Issue 20 item 18: a snapshot that does not read is the same error, with the same
        // exit code, whichever command meets it.
        Case {
            name: "bad_snapshot_stops_apply",
            files: &[(".capstan/snapshot.json", "{not json")],
            ..bad("", LOCAL, APPLY, 2)
        },
        Case {
            name: "bad_snapshot_stops_repair_too",
            files: &[(".capstan/snapshot.json", "{not json")],
            ..bad("", LOCAL, &["state", "repair"], 2)
        },
    ]
}

/// Every file under `dir` with its mode and contents, or `None` when `dir` does not exist.
/// The `lock` file is left out: a command that takes the lock writes who holds it there.
fn snapshot_of(dir: &Path) -> Option<BTreeMap<String, (u32, Vec<u8>)>> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        return None;
    }
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap().flatten() {
            let path = entry.path();
            let meta = entry.metadata().unwrap();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if name == "lock" {
                continue;
            }
            if meta.is_dir() {
                stack.push(path);
                files.insert(name, (meta.permissions().mode(), Vec::new()));
            } else {
                files.insert(
                    name,
                    (meta.permissions().mode(), std::fs::read(&path).unwrap()),
                );
            }
        }
    }
    Some(files)
}

fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        let text = text.replace("{TESTING}", &testing_provider());
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }
}

/// What a user sees, with the paths of this machine and the time replaced by stable names.
fn normalize(text: &str, dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or(dir.to_path_buf());
    let text = text
        .replace(&dir.display().to_string(), "[DIR]")
        .replace(&testing_provider(), "[TESTING]")
        .replace(capstan_bin(), "[CAPSTAN]");
    // Durations: "in 0.01s" on one machine is "in 0.02s" on another.
    let mut text = text;
    let mut from = 0;
    while let Some(at) = text[from..].find(" in ").map(|a| a + from + 4) {
        let digits = text[at..]
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len() - at);
        let unit = ["s", "ms", "µs"]
            .into_iter()
            .find(|u| text[at + digits..].starts_with(u));
        if let (true, Some(unit)) = (digits > 0, unit) {
            text.replace_range(at..at + digits + unit.len(), "[T]");
        }
        from = at;
    }
    // `journal.damaged-UNIXTIME`
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("journal.damaged-") {
        let end = at + "journal.damaged-".len();
        out.push_str(&rest[..end]);
        out.push_str("[TIME]");
        rest = rest[end..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

fn run_case(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    write_files(&dir, case.before);
    for args in case.setup {
        let out = Command::new(capstan_bin())
            .args(*args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: setup `{}` failed:\n{}",
            case.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    write_files(&dir, case.files);
    if let Some(deployment) = case.deployment.as_deref().filter(|d| !d.is_empty()) {
        write_files(&dir, &[("capstan.json", deployment)]);
    }
    let state = dir.join(".capstan");
    let before = snapshot_of(&state);
    let out = Command::new(capstan_bin())
        .args(case.args)
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = normalize(&String::from_utf8_lossy(&out.stdout), &dir);
    let stderr = normalize(&String::from_utf8_lossy(&out.stderr), &dir);
    let seen = format!(
        "$ capstan {}\nexit: {:?}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        case.args.join(" "),
        out.status.code()
    );
    assert_eq!(
        out.status.code(),
        Some(case.code),
        "{}: wrong exit code\n{seen}",
        case.name
    );
    if case.state_untouched {
        assert!(
            before == snapshot_of(&state),
            "{}: the state directory changed\n{seen}",
            case.name
        );
    }
    insta::with_settings!({prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!(case.name, seen);
    });
}

#[test]
fn every_bad_input_gets_its_message_and_exit_code() {
    let mut names = std::collections::BTreeSet::new();
    for case in cases() {
        assert!(names.insert(case.name), "two cases named {}", case.name);
        run_case(&case);
    }
}
