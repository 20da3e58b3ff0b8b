# Several machines, each a real sshd with its own Nix store (started by ./machines.sh), deployed
# in one apply: one system built here, copied to every machine over one SSH connection each,
# activated, confirmed over a new connection (else the machine rolls itself back), checked,
# and given a key. See the README's "NixOS machines over SSH". Apply it with:
#   sudo examples/machines/machines.sh start 3 && target/release/capstan apply -f examples/machines/capstan.nix --params examples/machines/run/machines.json --secrets examples/machines/run/secrets.json
{ capstan, params, resources, ... }:
{
  providers.nix = capstan.builtin "nix";
  providers.machine = capstan.builtin "machine";

  resources = {
    # The web servers' system, built here once with Nix's own progress.
    web-system = {
      provider = "nix";
      type = "build";
      inputs = {
        file = "system.nix";
        args = [ "--argstr" "role" "web" "--argstr" "motd" params.motd "--option" "substituters" "" ];
      };
    };

    # A machine per entry of machines.json, tagged so `--target @web` picks them all.
    fleet.resources = builtins.mapAttrs
      (name: machine: {
        provider = "machine";
        type = "nixos";
        tags = [ "web" name ];
        inputs = {
          target = "root@127.0.0.1";
          inherit (machine) port hostKey;
          inherit (params) identity;
          # A reference: filled in with what the build made.
          system = resources.web-system.output "outPath";
          # The example's builds are not signed.
          checkSigs = false;
          confirmTimeout = 10;
          checks = [
            { command = "grep -q . /run/motd"; }
          ];
          keys.api-token = {
            value = params.apiToken;
            mode = "0400";
          };
        };
      })
      params.machines;
  };
}
