# Capstan's Nix library: deployments written in Nix. Pure Nix, no nixpkgs needed.
#
# A deployment file evaluates to `{ providers = { … }; resources = { … }; }`, or to a function
# that takes any of these arguments and returns that:
#   capstan    this library (constructors below)
#   params     the parameters given with --params
#   resources  every resource of the deployment, with its outputs: resources.db.outputs.port
#
# `capstan` reads the file with `nix-instantiate` through `evaluate` (the end of this file); the
# README's "Deployments in Nix" page explains the rules. This file is one expression so that it
# can be handed to Nix as it is; `import ./lib.nix` gives the same library for a `nix repl`.
let
  inherit (builtins)
    attrNames
    concatMap
    concatStringsSep
    deepSeq
    elem
    filter
    functionArgs
    intersectAttrs
    isAttrs
    isFunction
    isString
    listToAttrs
    mapAttrs
    seq
    trace
    tryEval
    typeOf
    ;

  # Calls `f` with the arguments it names (all of them if it takes one plain argument); a value
  # that is not a function is taken as it is.
  call = f: args:
    if !(isFunction f) then
      f
    else if functionArgs f == { } then
      f args
    else
      f (intersectAttrs (functionArgs f) args);

  isNested = d: isAttrs d && (d._capstan or null) == "nested";
  # What a value is, for a message: "an integer", "a string", …
  kindName = v:
    {
      int = "an integer";
      float = "a number";
      string = "a string";
      bool = "a boolean";
      null = "null";
      list = "a list";
      lambda = "a function";
      path = "a path";
      set = "an attribute set";
    }.${typeOf v} or (typeOf v);
  isGroup = d: isAttrs d && !(d ? type) && !(d ? provider) && d ? resources;

  # An address: names joined with `.`; a name with `.`, `#` or a control character would make
  # addresses (and the trace lines read by capstan) ambiguous.
  join = prefix: name:
    if builtins.match "[^.#[:cntrl:]]+" name == null then
      throw "capstan: the name `${name}`${if prefix == "" then "" else " in `${prefix}`"} must be non-empty and must not contain `.`, `#` or control characters (they separate groups, members and outputs in addresses)"
    else if prefix == "" then name else "${prefix}.${name}";

  resourceKeys = [ "provider" "type" "inputs" "outputs" "tags" ];

  capstan = {
    # Providers, as `providers.<name> = …`. Each is an attribute set like a capstan.json
    # provider declaration, so options can be added with `//`:
    #   providers.web = capstan.executable ./web-provider // { maxConcurrency = 4; };
    builtin = name: { builtin = name; };
    executable = path: { executable = toString path; };
    socket = path: { socket = toString path; };
    # An existing NixOps4 version-0 provider, run through Capstan's bridge (its resources list
    # their `outputs`).
    nixops4 = path: {
      executable = toString path;
      protocol = "nixops4-v0";
    };

    # Members under one name, addressed `<group>.<member>` (as `{ resources = { … }; }`).
    group = members: { resources = members; };

    # A nested deployment: its members are a function of other resources' outputs. The function
    # takes the same arguments as a deployment file and returns members (resources, groups,
    # nested deployments). It is evaluated once the outputs it uses exist; its members are
    # addressed `<name>.<member>`.
    nested = function: {
      _capstan = "nested";
      inherit function;
    };

    # A reference the engine fills in when the output exists, without evaluating again (the
    # JSON form `{"$ref": "db#port"}`): `resources.db.output "port"`, also `capstan.ref "db" "port"`.
    ref = address: output: { "$ref" = "${address}#${output}"; };
    # A capability resource `address` returned, as an input's whole value.
    cap = address: name: { "$cap" = "${address}#${name}"; };
    # A secret (`{"$sensitive": value}`): passed to the provider and kept in the private
    # state, shown nowhere: inputs.password = capstan.sensitive params.password;
    sensitive = value: { "$sensitive" = value; };
  };

  # Reads a deployment for `capstan`. `known` maps addresses to the outputs that exist now; an
  # output that does not exist yet throws when it is used, so a resource whose inputs use one
  # is deferred (listed, not declared) and a nested deployment whose members need one is left
  # for later. Trace lines tell `capstan` what each deferred thing waited for (fields after
  # `#`, which no address holds), each starting with `mark`, a word made for this evaluation
  # that the deployment never sees (so its own traces cannot pass for these):
  #   MARK-eval#ADDRESS    the next item being read
  #   MARK-touch#ADDRESS   it used outputs of ADDRESS, which do not exist yet
  #   MARK-found#ADDRESS   outputs of ADDRESS (given in `known`) were used by something
  #   MARK-cycle#A#B…      the members of nested deployment A depend on themselves
  # `raise` lists items to read without catching, to show the error that deferred them.
  evaluate =
    { file, params, known, raise ? [ ], only ? "all", settled ? { }, mark ? "capstan" }:
    let
      args = view: {
        inherit capstan params;
        resources = view;
      };
      # With outputs given, the instance read for the deployment traces `MARK-found#ADDRESS`
      # when an output of ADDRESS is first used: what was used at all.
      main = instance (if someKnown then "found" else null);
      inherit (main) root view topChecked;

      # The deployment, called with its own view of `resources`. With a `tag`, each known
      # output traces `MARK-TAG#ADDRESS` when first used: an instance read for one item
      # tells everything that item used (see `usesTraces`).
      instance = tag: rec {
        top = call (import file) (args root);
        topChecked =
          if !isAttrs top then
            throw "capstan: ${toString file} must give an attribute set { providers = …; resources = …; } (or a function returning one), not ${kindName top}"
          else
            let unknown = filter (k: !(elem k [ "providers" "resources" ])) (attrNames top);
            in if unknown != [ ] then
              throw "capstan: ${toString file}: unknown key `${concatStringsSep "`, `" unknown}`; a deployment has `providers` and `resources`"
            else if top ? resources && !isAttrs top.resources then
              throw "capstan: ${toString file}: `resources` must be an attribute set of resources (name = { provider = …; type = …; inputs = …; }), not ${kindName top.resources}"
            else if top ? providers && !isAttrs top.providers then
              throw "capstan: ${toString file}: `providers` must be an attribute set of providers (name = capstan.builtin \"local\", …), not ${kindName top.providers}"
            else
              top;

        # What `resources` shows from inside the structure of the nested deployments in `stack`
        # (outermost first): those cannot be looked into, which would be infinite recursion.
        view = stack: members stack "" (topChecked.resources or { });
        root = view [ ];
        members = stack: prefix: decls: mapAttrs (name: d: member stack (join prefix name) d) decls;
        # A nested deployment's members, as its function gives them for `resources`.
        membersOf = address: d: resources:
          let got = call d.function (args resources); in
          if isAttrs got then got
          else throw "capstan: nested deployment `${address}`: its function must return an attribute set of members (name = { provider = …; type = …; … }), not ${kindName got}";
        member = stack: address: d:
          if isNested d then
            nestedView stack address d
          else if isGroup d then
            members stack address d.resources
          else
            resourceView address d;
        nestedView = stack: address: d:
          if elem address stack then
            trace "${mark}-cycle#${concatStringsSep "#" (stack ++ [ address ])}"
              (throw "capstan: the members of nested deployment `${address}` depend on themselves (${concatStringsSep " → " (stack ++ [ address ])})")
          else
            members stack address (membersOf address d (view (stack ++ [ address ])));
        resourceView = address: d: {
          inherit address;
          provider = d.provider;
          type = d.type;
          outputs =
            if known ? ${address} then
              (if tag != null then trace "${mark}-${tag}#${address}" known.${address} else known.${address})
            else
              trace "${mark}-touch#${address}"
                (throw "capstan: the outputs of `${address}` do not exist yet; a provider declaration or the set of resources cannot depend on them (put what depends on them in `capstan.nested`)");
          output = capstan.ref address;
          capability = capstan.cap address;
        };
      };

      # What the resources read for the first time with outputs given used, as trace lines:
      # `MARK-uses#ADDRESS` then a `MARK-use#X` per resource X whose outputs it used
      # (its nested deployments' structure included). Each is read from an instance of its
      # own, so outputs another item used first are seen too; past `perItem` of them, one
      # instance reads them all (`capstan-uses-all#`: each is taken to use all it found).
      someKnown = attrNames known != [ ];
      perItem = 64;
      # An instance's declarations as a tree, each nested deployment's function called once.
      declTree = t: decls: mapAttrs
        (_: d:
          if isNested d then { members = declTree t (call d.function (args t.root)); }
          else if isGroup d then { members = declTree t d.resources; }
          else { resource = d; })
        decls;
      find = tree: address:
        builtins.foldl' (node: name: (node.members or node).${name}) { members = tree; }
          (filter isString (builtins.split "[.]" address));
      readIn = t: address: declOf address (find t.tree address).resource;
      # A new instance at each call (a function's body is not shared between calls).
      traced = _: let t = instance "use"; in t // { tree = declTree t (t.topChecked.resources or { }); };
      usesTraces = fresh:
        if !someKnown || fresh == [ ] then [ ]
        else if builtins.length fresh <= perItem then
          map (address: trace "${mark}-uses#${address}" (deepSeq (readIn (traced address) address) null)) fresh
        else
          let t = traced null; in
          [ (trace "${mark}-uses-all#" (deepSeq (map (readIn t) fresh) null)) ];

      # Reads `value` fully for item `address`, catching what it throws unless told not to.
      attempt = address: value:
        if elem address raise then
          {
            success = true;
            value = deepSeq value value;
          }
        else
          trace "${mark}-eval#${address}" (tryEval (deepSeq value value));

      kindOf = d: if isNested d then "nested" else if isGroup d then "group" else "resource";

      walk = prefix: decls:
        let
          items = mapAttrs (name: d: walkMember (join prefix name) d) decls;
          names = attrNames items;
        in
        {
          tree = listToAttrs (concatMap
            (name: if items.${name} ? tree then [{ inherit name; value = items.${name}.tree; }] else [ ])
            names);
          deferred = concatMap (name: items.${name}.deferred) names;
          read = concatMap (name: items.${name}.read or [ ]) names;
        };

      # One attempt per resource: its kind and its whole declaration.
      walkMember = address: d:
        let
          read = attempt address (
            let kind = seq d (kindOf d); in
            if kind == "resource" then { inherit kind; decl = declOf address d; } else { inherit kind; }
          );
        in
        if !read.success then
          let
            # What it is, if that much can be read (a resource whose inputs wait, usually).
            kind = tryEval (seq d (kindOf d));
          in
          # Read now, right after the item's own trace line, so what it touches is its own.
          seq kind.success { deferred = [{ inherit address; what = if kind.success && kind.value == "resource" then "resource" else "member"; }]; }
        else if read.value.kind == "group" then
          let w = walk address d.resources; in { tree = { resources = w.tree; }; inherit (w) deferred read; }
        else if read.value.kind == "nested" then
          walkNested address d
        else
          walkResource address d read.value.decl;

      walkNested = address: d:
        let
          # The members' names and kinds, from a view in which this deployment's own members
          # cannot be looked into.
          structure = attempt address
            (mapAttrs (_: kindOf) (main.membersOf address d (view [ address ])));
          w = walk address (main.membersOf address d root);
        in
        if !structure.success then
          { deferred = [{ inherit address; what = "nested"; }]; }
        else
          { tree = { resources = w.tree; }; inherit (w) deferred read; };

      declOf = address: d: {
        provider = d.provider or (throw "capstan: resource `${address}` has no `provider`");
        type = d.type or (throw "capstan: resource `${address}` has no `type`");
        inputs = d.inputs or { };
      } // (if d ? outputs then { inherit (d) outputs; } else { })
        // (if d ? tags then { inherit (d) tags; } else { });

      walkResource = address: d: decl:
        let
          unknown = filter (k: !(elem k resourceKeys)) (attrNames d);
        in
        if unknown != [ ] then
          throw "capstan: resource `${address}`: unknown key `${concatStringsSep "`, `" unknown}`; a resource has `provider`, `type`, `inputs`, `outputs` and `tags`"
        else if !isString decl.provider || !isString decl.type then
          throw "capstan: resource `${address}`: `provider` and `type` are strings (a provider's name in `providers`, a type it offers)"
        else
          {
            tree = decl;
            deferred = [ ];
            read = [ address ];
          };

      providers = topChecked.providers or { };
      everything = walk "" (topChecked.resources or { });
    in
    if only == "providers" then
      { inherit providers; }
    else
      {
        inherit providers;
        resources = everything.tree;
        inherit (everything) deferred;
        # Printed last (keys are printed in order): its trace lines follow all others.
        zzUses = usesTraces (filter (a: !(settled ? ${a})) everything.read);
      };
in
capstan // { inherit evaluate; }
