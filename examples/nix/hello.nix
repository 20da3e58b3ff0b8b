# A build that takes a few seconds and says what it is doing, then an activation program.
# Builder is /bin/sh, so it builds offline with Debian's nix-bin and no nixpkgs.
{ greeting ? "hello from a Nix build" }:
derivation {
  name = "capstan-hello";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  inherit greeting;
  args = [ "-c" ''
    for step in fetching configuring compiling linking; do
      echo "$step..."
      sleep 0.5
    done
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "activating: %s"\necho "switched to $0"\n' "$greeting" > $out/bin/activate
    chmod +x $out/bin/activate
    echo done
  '' ];
}
