# A deployment written in Nix (see the README's "Deployments in Nix"). Apply it with:
#   capstan apply -f examples/nix-deployment/capstan.nix --params examples/nix-deployment/params.json
{ capstan, params, resources, ... }:
let
  # Plain Nix: no nixpkgs needed.
  range = n: builtins.genList (i: i + 1) n;
in
{
  providers.local = capstan.builtin "local";

  resources = {
    # The site's settings, from --params.
    site = {
      provider = "local";
      type = "memo";
      inputs.value = { inherit (params) name replicas; };
    };

    # Computes with `site`'s outputs: deferred until they exist, then evaluated again with the
    # real values (never with a stand-in).
    index = {
      provider = "local";
      type = "file";
      inputs = {
        path = "out/index.html";
        content = "<h1>${resources.site.outputs.value.name}</h1> on ${toString resources.site.outputs.value.replicas} replica(s)\n";
      };
    };

    # A reference the engine fills in (`{"$ref": "index#content"}`): planned at once.
    announce = {
      provider = "local";
      type = "exec";
      inputs = {
        command = "wc";
        args = [ "-c" ];
        stdin = resources.index.output "content";
      };
    };

    # A nested deployment: how many replicas there are is `site`'s output, so its members are
    # known only once `site` exists. Addressed replicas.r1, replicas.r2, …
    replicas = capstan.nested ({ resources, ... }:
      builtins.listToAttrs (map
        (i: {
          name = "r${toString i}";
          value = {
            provider = "local";
            type = "file";
            inputs = {
              path = "out/replica-${toString i}.conf";
              content = "serve ${resources.index.outputs.path} as replica ${toString i}\n";
            };
          };
        })
        (range resources.site.outputs.value.replicas)));
  };
}
