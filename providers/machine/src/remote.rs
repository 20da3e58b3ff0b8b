//! The shell the provider runs on a machine (POSIX `sh`, coreutils, util-linux's `setsid`,
//! Nix's `nix-env`: what every NixOS has). Paths and names travel as arguments, never
//! spliced into the text; secrets travel on stdin, never as arguments.

/// Sourced by the worker, the watchdog and a rollback asked for later: how to go back to
/// what ran before. Needs `profile`, `goal` and `dir` (where the activation keeps its notes:
/// `prevlink`, `prev`, `running`, `newlink`).
const LIB: &str = r#"
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
"#;

/// Activates, detached from the SSH session (a configuration that cuts the connection cannot
/// cut the activation short): sets the profile (for `switch` and `boot`), runs
/// `switch-to-configuration`, rolls back if that fails, and starts the watchdog when a
/// confirmation is asked for. Its status goes to `$dir/status`.
const WORKER: &str = r#"
set -u
profile=$1 system=$2 goal=$3 dir=$4 confirm=$5 timeout=$6
. "$dir/lib.sh"
finish() { echo "$1" > "$dir/status.tmp"; mv "$dir/status.tmp" "$dir/status"; exit "$1"; }
if [ -L "$profile" ]; then
  readlink "$profile" > "$dir/prevlink"; readlink -f "$profile" > "$dir/prev"
else
  : > "$dir/prevlink"; : > "$dir/prev"
fi
if [ -L /run/current-system ]; then readlink -f /run/current-system > "$dir/running"; else : > "$dir/running"; fi
say previous "$(cat "$dir/running")"
case $goal in
  switch|boot)
    mkdir -p "$(dirname "$profile")"
    if ! nix-env -p "$profile" --set "$system"; then say error "nix-env could not point $profile at $system"; finish 2; fi
    readlink "$profile" > "$dir/newlink"
    say generation "$(num "$(cat "$dir/newlink")")" ;;
esac
if ! "$system/bin/switch-to-configuration" "$goal"; then
  [ "$goal" = dry-activate ] && finish 3
  rollback "switch-to-configuration $goal failed"
  finish 3
fi
if [ "$confirm" = 1 ]; then
  setsid sh "$dir/watchdog" "$@" </dev/null >>"$dir/watchdog.log" 2>&1 &
  say waiting "$timeout"
fi
finish 0
"#;

/// Waits for the deployer's confirmation (`$dir/claim`, made over a new connection); without
/// it, claims the activation itself and rolls back.
const WATCHDOG: &str = r#"
set -u
profile=$1 system=$2 goal=$3 dir=$4 confirm=$5 timeout=$6
. "$dir/lib.sh"
i=0
while [ "$i" -lt $((timeout * 10)) ]; do
  [ -e "$dir/claim" ] && exit 0
  sleep 0.1
  i=$((i + 1))
done
if mkdir "$dir/claim" 2>/dev/null; then
  echo watchdog > "$dir/claim/by"
  rollback "it was not confirmed over a new SSH connection within ${timeout} s"
fi
"#;

/// Run over the master connection: writes the scripts, starts the worker detached, and
/// follows its log until it ends; exits with its status (99: it left none).
pub(crate) fn launcher() -> String {
    format!(
        r#"set -eu
dir=$4
umask 077
mkdir -p /run/capstan
mkdir "$dir"
cat > "$dir/lib.sh" <<'CAPSTAN_LIB'
{LIB}
CAPSTAN_LIB
cat > "$dir/worker" <<'CAPSTAN_WORKER'
{WORKER}
CAPSTAN_WORKER
cat > "$dir/watchdog" <<'CAPSTAN_WATCHDOG'
{WATCHDOG}
CAPSTAN_WATCHDOG
: > "$dir/log"
setsid sh "$dir/worker" "$@" </dev/null >"$dir/log" 2>&1 &
pid=$!
tail -n +1 -s 0.1 --pid="$pid" -f "$dir/log"
wait "$pid" 2>/dev/null || true
status=$(cat "$dir/status" 2>/dev/null || echo 99)
exit "$status"
"#
    )
}

/// Over a new connection: claims the activation for the deployer (`confirmed`), unless the
/// watchdog already has (prints who has).
pub(crate) const CONFIRM: &str = r#"
if mkdir "$1/claim" 2>/dev/null; then echo deployer > "$1/claim/by"; echo confirmed; else cat "$1/claim/by" 2>/dev/null || echo unknown; fi
"#;

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

/// What the machine runs: `profile LINK TARGET` and `running TARGET` (`-` for none).
pub(crate) const PROBE: &str = r#"
p=$1
if [ -L "$p" ]; then echo "profile $(readlink "$p") $(readlink -f "$p")"; else echo "profile - -"; fi
if [ -L /run/current-system ]; then echo "running $(readlink -f /run/current-system)"; else echo "running -"; fi
"#;

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
