//! The shell the provider runs on a machine (POSIX `sh`, coreutils, util-linux's `setsid`,
//! Nix's `nix-env`: what every NixOS has). Paths and names travel as arguments, never
//! spliced into the text; secrets travel on stdin, never as arguments.

/// Shell that sets `link` (what the profile `$1` points at), `real` (where that leads) and
/// `run` (where `/run/current-system` leads), each empty for none, with one `readlink` per
/// kind of question (each is a process, and a deployment asks on every host).
macro_rules! links {
    () => {
        r#"
links() {
  link= real= run=
  if [ -L "$1" ]; then
    link=$(readlink "$1")
    if [ -L /run/current-system ]; then
      both=$(readlink -f "$1" /run/current-system)
      case $both in
        *'
'*) real=${both%%'
'*} run=${both#*'
'} ;;
        *) real=$(readlink -f "$1") run=$(readlink -f /run/current-system) ;;
      esac
    else
      real=$(readlink -f "$1")
    fi
  elif [ -L /run/current-system ]; then
    run=$(readlink -f /run/current-system)
  fi
}
"#
    };
}

/// Shell that prints what runs: `profile LINK TARGET` for the profile `$p`, and `running
/// TARGET` (`-` for none).
macro_rules! what_runs {
    () => {
        concat!(
            links!(),
            r#"
links "$p"
echo "profile ${link:--} ${real:--}"
echo "running ${run:--}"
"#
        )
    };
}

/// Sourced by the worker, the watchdog and a rollback asked for later: how to go back to
/// what ran before. Needs `profile`, `goal` and `dir` (where the activation keeps its notes:
/// `prevlink`, `prev`, `running`, `newlink`).
const LIB: &str = concat!(
    links!(),
    r#"
num() { l=${1%-link}; echo "${l##*-}"; }
say() { echo "@capstan $*"; }
rollback() {
  prevlink=$(cat "$dir/prevlink" 2>/dev/null || true)
  prev=$(cat "$dir/prev" 2>/dev/null || true)
  newlink=$(cat "$dir/newlink" 2>/dev/null || true)
  running=$(cat "$dir/running" 2>/dev/null || true)
  say rollback "$1"
  case $goal in
    switch|boot)
      if [ -n "$prevlink" ]; then
        nix-env -p "$profile" --switch-generation "$(num "$prevlink")"
      else
        rm -f "$profile"
      fi
      if [ -n "$newlink" ] && [ "$newlink" != "$prevlink" ]; then
        nix-env -p "$profile" --delete-generations "$(num "$newlink")" || true
      fi ;;
  esac
  back=$running
  [ -n "$back" ] || back=$prev
  if [ "$goal" != boot ] && [ -n "$back" ] && [ -x "$back/bin/switch-to-configuration" ]; then
    "$back/bin/switch-to-configuration" "$goal" || say rollback-failed "the activation of $back failed too"
  fi
  echo "$1" > "$dir/rolledback"
}
"#
);

/// Activates, detached from the SSH session (a configuration that cuts the connection cannot
/// cut the activation short): sets the profile (for `switch` and `boot`), runs
/// `switch-to-configuration`, rolls back if that fails, and starts the watchdog when a
/// confirmation is asked for. Its status goes to `$dir/status`.
const WORKER: &str = r#"
set -u
profile=$1 system=$2 goal=$3 dir=$4 confirm=$5 timeout=$6
. "$dir/lib.sh"
finish() { echo "$1" > "$dir/status.tmp"; mv "$dir/status.tmp" "$dir/status"; exit "$1"; }
links "$profile"
prevlink=$link prev=$real running=$run
printf '%s\n' "$prevlink" > "$dir/prevlink"
printf '%s\n' "$prev" > "$dir/prev"
printf '%s\n' "$running" > "$dir/running"
# Watchdogs of earlier activations still waiting (a run stopped while confirming): this
# activation supersedes them. Each is claimed and stopped, so none rolls back what follows,
# and what ran before it (the last confirmed state) is what this one goes back to.
superseded=
for other in /run/capstan/*; do
  [ "$other" = "$dir" ] && continue
  [ -f "$other/watchdog.pid" ] || continue
  if mkdir "$other/claim" 2>/dev/null; then
    echo superseded > "$other/claim/by"
    read -r w < "$other/watchdog.pid" && kill -TERM "-$w" 2>/dev/null
    superseded=$other
  fi
done
if [ -n "$superseded" ]; then
  for note in prevlink prev running; do
    cp "$superseded/$note" "$dir/$note" 2>/dev/null || true
  done
  read -r prevlink < "$dir/prevlink" || prevlink=
  read -r prev < "$dir/prev" || prev=
  read -r running < "$dir/running" || running=
  rm -rf "$superseded"
fi
# Notes of activations settled (claimed) over an hour ago: nobody asks for them any more.
for claim in /run/capstan/*/claim; do
  [ -d "$claim" ] && [ -n "$(find "$claim" -maxdepth 0 -mmin +60)" ] && rm -rf "${claim%/claim}"
done
say previous "$running"
# Already what was asked for (switched by hand, or by a run that was interrupted and
# confirmed): nothing to do. An unconfirmed activation just superseded is confirmed anew.
if [ "$goal" != dry-activate ] && [ -z "$superseded" ]; then
  same=1
  case $goal in switch|test) [ "$running" = "$system" ] || same=0 ;; esac
  case $goal in switch|boot) [ "$prev" = "$system" ] || same=0 ;; esac
  if [ "$same" = 1 ]; then say already "$system"; finish 0; fi
fi
case $goal in
  switch|boot)
    [ -d "${profile%/*}" ] || mkdir -p "${profile%/*}"
    if ! nix-env -p "$profile" --set "$system"; then say error "nix-env could not point $profile at $system"; finish 2; fi
    newlink=$(readlink "$profile")
    printf '%s\n' "$newlink" > "$dir/newlink"
    say generation "$(num "$newlink")" ;;
esac
if ! "$system/bin/switch-to-configuration" "$goal"; then
  [ "$goal" = dry-activate ] && finish 3
  rollback "switch-to-configuration $goal failed"
  finish 3
fi
if [ "$confirm" = 1 ]; then
  # In a session of its own: stopping it (its process group) stops nothing else, not even
  # what the activation left running in the worker's.
  setsid sh "$dir/watchdog" "$@" </dev/null >>"$dir/watchdog.log" 2>&1 &
  echo "$!" > "$dir/watchdog.pid"
  say waiting "$timeout"
fi
finish 0
"#;

/// Sleeps until the deadline, then claims the activation and rolls back, unless the deployer
/// claimed it first (`$dir/claim`, made over a new connection; the deployer then stops this
/// watchdog, its process group, so nothing lingers).
const WATCHDOG: &str = r#"
set -u
profile=$1 system=$2 goal=$3 dir=$4 confirm=$5 timeout=$6
. "$dir/lib.sh"
sleep "$timeout"
if mkdir "$dir/claim" 2>/dev/null; then
  echo watchdog > "$dir/claim/by"
  rollback "it was not confirmed over a new SSH connection within ${timeout} s"
fi
"#;

/// Run over the master connection: writes the scripts (with the shell's own `printf`: no
/// process per file), starts the worker detached, and follows its log until it ends; exits
/// with its status (99: it left none).
pub(crate) fn launcher() -> String {
    use crate::ssh::quote;
    format!(
        r#"set -eu
dir=$4
umask 077
[ -d /run/capstan ] || mkdir -p /run/capstan
mkdir "$dir"
printf '%s' {lib} > "$dir/lib.sh"
printf '%s' {worker} > "$dir/worker"
printf '%s' {watchdog} > "$dir/watchdog"
: > "$dir/log"
setsid sh "$dir/worker" "$@" </dev/null >"$dir/log" 2>&1 &
pid=$!
tail -n +1 -s 0.02 --pid="$pid" -f "$dir/log"
wait "$pid" 2>/dev/null || true
status=99
[ -f "$dir/status" ] && read -r status < "$dir/status"
exit "$status"
"#,
        lib = quote(LIB),
        worker = quote(WORKER),
        watchdog = quote(WATCHDOG),
    )
}

/// Over a new connection: claims the activation for the deployer (`confirmed`) and stops the
/// watchdog, unless the watchdog already has (prints who has): `dir profile finish`. A claim
/// the deployer already holds (an attempt whose answer was lost) is `confirmed` too. With
/// `finish` 1, then says what `PROBE` says and removes the activation's notes.
pub(crate) const CONFIRM: &str = concat!(
    r#"
claimed=
if mkdir "$1/claim" 2>/dev/null; then
  echo deployer > "$1/claim/by"
  [ -f "$1/watchdog.pid" ] && read -r w < "$1/watchdog.pid" && kill -TERM "-$w" 2>/dev/null
  claimed=1
elif [ ! -d "$1" ] || [ "$(cat "$1/claim/by" 2>/dev/null)" = deployer ]; then
  # An earlier attempt of this confirmation got through; its answer was lost.
  claimed=1
fi
if [ -n "$claimed" ]; then
  echo confirmed
  if [ "$3" = 1 ]; then
    p=$2
"#,
    what_runs!(),
    r#"
    rm -rf "$1"
  fi
else
  cat "$1/claim/by" 2>/dev/null || echo unknown
fi
"#
);

/// What happened to an activation the connection lost: its status, and the rollback's reason.
pub(crate) const OUTCOME: &str = r#"
cat "$1/status" 2>/dev/null || echo none
cat "$1/rolledback" 2>/dev/null || true
"#;

/// Rolls an activation back now (a health check failed): `profile system goal dir why`.
pub(crate) const ROLLBACK: &str = r#"
set -u
profile=$1 system=$2 goal=$3 dir=$4
. "$dir/lib.sh"
rollback "$5" 2>&1
"#;

/// What the machine runs: `profile`.
pub(crate) const PROBE: &str = concat!("p=$1\n", what_runs!());

/// Removes an activation's notes (`$2`, when not empty), then says what `PROBE` says.
pub(crate) const FINISH: &str = concat!("[ -n \"$2\" ] && rm -rf \"$2\"\np=$1\n", what_runs!());

/// Of the store paths on stdin (one per line), those the machine's store lacks.
pub(crate) const INVALID: &str = r#"xargs -r nix-store --check-validity --print-invalid"#;

/// Writes a key from stdin: `dest user group mode`, atomically, never readable by others
/// on the way.
pub(crate) const UPLOAD_KEY: &str = r#"
set -eu
dest=$1 user=$2 group=$3 mode=$4
umask 077
mkdir -p "$(dirname "$dest")"
tmp="$dest.capstan-tmp.$$"
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
chown "$user:$group" "$tmp"
chmod "$mode" "$tmp"
mv -f "$tmp" "$dest"
trap - EXIT
"#;

/// Removes keys: every argument a path.
pub(crate) const REMOVE_KEYS: &str = r#"for k in "$@"; do rm -f "$k"; done"#;

/// Removes an activation's notes.
pub(crate) const CLEAN: &str = r#"rm -rf "$1""#;

/// Runs the reboot command detached, a moment later (so this command returns first).
pub(crate) const REBOOT: &str =
    r#"setsid sh -c 'sleep 1; eval "$1"' capstan "$1" </dev/null >/dev/null 2>&1 &"#;

/// Runs a health check command.
pub(crate) const CHECK: &str = r#"eval "$1""#;

#[cfg(test)]
mod tests {
    use super::*;

    /// The scripts as `sh -n` reads them: a syntax error would only show on a machine.
    #[test]
    fn every_script_parses() {
        for (name, script) in [
            ("launcher", launcher()),
            ("lib", LIB.to_string()),
            ("worker", WORKER.to_string()),
            ("watchdog", WATCHDOG.to_string()),
            ("confirm", CONFIRM.to_string()),
            ("outcome", OUTCOME.to_string()),
            ("rollback", ROLLBACK.to_string()),
            ("probe", PROBE.to_string()),
            ("finish", FINISH.to_string()),
            ("invalid", INVALID.to_string()),
            ("upload", UPLOAD_KEY.to_string()),
            ("remove", REMOVE_KEYS.to_string()),
            ("reboot", REBOOT.to_string()),
        ] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
