# A machine's "system" for the example, without nixpkgs (none is reachable offline): a store
# path with `bin/switch-to-configuration`, as a NixOS toplevel has. Its activation writes the
# message of the day and points /run/current-system at itself, as NixOS's does.
{ role, motd, sizeKiB ? 256 }:
builtins.derivation {
  name = "example-${role}-system";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  inherit motd;
  args = [ "-c" ''
    mkdir -p $out/bin $out/etc
    printf '%s\n' "$motd" > $out/etc/motd
    head -c ${toString (sizeKiB * 1024)} /dev/urandom > $out/payload
    cat > $out/bin/switch-to-configuration <<SCRIPT
    #!/bin/sh
    echo "switching to ${role} (\$1)"
    if [ "\$1" = switch ] || [ "\$1" = test ]; then
      mkdir -p /run
      cp $out/etc/motd /run/motd
      ln -sfn $out /run/current-system
    fi
    echo "${role} is active"
    SCRIPT
    chmod +x $out/bin/switch-to-configuration
  '' ];
}
