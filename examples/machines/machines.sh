#!/bin/sh
# Machines to deploy the example to, on this computer: each a real OpenSSH server on a
# loopback port, in a mount namespace of its own with a private /nix (its own Nix store and
# profiles), /run and root's home, with its own host key. Needs root, openssh-server and Nix
# (apt-get install openssh-server nix-bin).
#
#   machines.sh start N   start N machines (web1 … webN); writes run/machines.json (ports,
#                         host keys, the key to log in with) and run/secrets.json (a token)
#   machines.sh stop      stop them and remove what they kept
set -eu
here=$(cd "$(dirname "$0")" && pwd)
run="$here/run"

stop() {
  for dir in "$run"/machine-*; do
    [ -d "$dir" ] || continue
    touch "$dir/stop"
    [ -f "$dir/supervisor.pid" ] && kill "$(cat "$dir/supervisor.pid")" 2>/dev/null || true
    if [ -f "$dir/etc/sshd.pid" ]; then
      pkill -P "$(cat "$dir/etc/sshd.pid")" 2>/dev/null || true
      kill "$(cat "$dir/etc/sshd.pid")" 2>/dev/null || true
    fi
  done
  rm -rf "$run"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "${1:-}" in
  start)
    count=${2:-3}
    [ "$(id -u)" = 0 ] || { echo "machines.sh: needs root (a mount namespace per machine)" >&2; exit 1; }
    [ -x /usr/sbin/sshd ] || { echo "machines.sh: install openssh-server first" >&2; exit 1; }
    stop
    mkdir -p "$run/client"
    chmod 700 "$run"
    ssh-keygen -q -t ed25519 -N '' -f "$run/client/id"
    entries=""
    i=1
    while [ "$i" -le "$count" ]; do
      name="web$i"
      dir="$run/machine-$name"
      mkdir -p "$dir/nix" "$dir/etc" "$dir/etc-nix"
      chmod 700 "$dir/etc"
      # Nix's settings of its own: builds as root, not as this computer's build users (two
      # stores handing out nixbld1 at once kill each other's builds).
      printf 'sandbox = false\nbuild-users-group =\n' > "$dir/etc-nix/nix.conf"
      ssh-keygen -q -t ed25519 -N '' -f "$dir/etc/host_key"
      cp "$run/client/id.pub" "$dir/etc/authorized_keys"
      port=$(free_port)
      cat > "$dir/etc/sshd_config" <<CONFIG
Port $port
ListenAddress 127.0.0.1
HostKey $dir/etc/host_key
AuthorizedKeysFile $dir/etc/authorized_keys
PidFile $dir/etc/sshd.pid
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
LogLevel VERBOSE
CONFIG
      unshare -m --propagation private sh -c "
        mount --make-rprivate /
        mount --bind '$dir/nix' /nix
        mount --bind '$dir/etc-nix' /etc/nix
        mount -t tmpfs tmpfs /run
        mount -t tmpfs tmpfs /root
        mkdir -p /run/sshd
        while [ ! -e '$dir/stop' ]; do
          /usr/sbin/sshd -D -f '$dir/etc/sshd_config' -E '$dir/sshd.log'
          sleep 1
        done" </dev/null >/dev/null 2>&1 &
      echo $! > "$dir/supervisor.pid"
      key=$(cut -d' ' -f1,2 "$dir/etc/host_key.pub")
      entries="$entries${entries:+, }\"$name\": {\"port\": $port, \"hostKey\": \"$key\"}"
      i=$((i + 1))
    done
    cat > "$run/machines.json" <<JSON
{"identity": "$run/client/id", "motd": "deployed by capstan", "machines": {$entries}}
JSON
    (umask 077; printf '{"apiToken": "%s"}\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$run/secrets.json")
    # Until every sshd listens.
    for dir in "$run"/machine-*; do
      port=$(awk '/^Port/ {print $2}' "$dir/etc/sshd_config")
      tries=0
      until python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; do
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || { echo "machines.sh: sshd on port $port does not start; see $dir/sshd.log" >&2; exit 1; }
        sleep 0.1
      done
    done
    echo "started $count machine(s); parameters in $run/machines.json"
    ;;
  stop)
    stop
    echo "stopped"
    ;;
  *)
    echo "usage: $0 start [N] | stop" >&2
    exit 2
    ;;
esac
