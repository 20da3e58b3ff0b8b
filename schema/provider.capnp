@0x8cece573ae0ab347;
# Capstan provider protocol: the contract between the Capstan core and a provider process.
#
# A provider is a long-lived process that manages resources of one or more types. It offers a
# `Provider` as the bootstrap capability of a two-party Cap'n Proto RPC connection over a Unix
# socket. The core starts it with the connection already made (systemd's socket-activation
# convention: LISTEN_FDS=1, LISTEN_PID=<its pid>, the socket is fd 3), or connects to a socket
# a standing provider listens on.
#
# LISTEN_PID must be the provider's own pid, which only the child knows after fork: a host
# sets it between fork and exec. A host in a runtime that cannot run code there (Python's
# subprocess, for one) starts the provider through a shell that keeps its pid across exec:
#   sh -c 'LISTEN_PID=$$ exec "$0" "$@"' PROVIDER ARGS...   (with LISTEN_FDS=1, the socket as fd 3)
# A provider seeing LISTEN_FDS with a LISTEN_PID that is not its own says so and exits.
#
# One connection carries every operation of a deployment run, concurrently. A call's result
# arrives when the operation has finished; while it runs, progress flows through the
# operation's `ProgressSink`.
#
# Cancellation: the core cancels an operation by dropping its call (Cap'n Proto sends `Finish`
# before the result arrived) — when the call outlives its timeout (`--timeout`, a provider's
# `timeout` in the deployment), when the run is interrupted (Ctrl-C, SIGTERM, SIGHUP), and
# when the core shuts down. The provider should stop the operation promptly (kill what it
# started) and may return anything: the result is discarded. The core cannot know whether a
# cancelled operation took effect, so it records it as interrupted ("pending"); the user checks
# the resource and resolves it (`capstan state resolve`) or applies again. An operation that
# was interrupted during `create` may be sent `create` again in a later run, for a resource
# that may already exist: a provider should find and adopt it where it can, or fail clearly.
#
# Results: a successful create, update or read returns every output its type declares; a result
# without one is an error at once (the resource is recorded as returned, its dependents are
# skipped), never a placeholder.
#
# Evolution rules (see `schema/EVOLUTION.md`): this file only ever grows. Fields, methods,
# union variants and enum values are added with new ordinal numbers; none is removed, renumbered
# or changed in type. A reader meeting an enum value or union variant it does not know treats
# it as documented at that type. Breaking changes need a new `protocolVersion`, negotiated in
# `hello`.

using Progress = import "progress.capnp";

const protocolVersion :UInt32 = 1;
# The newest protocol version this schema describes.

interface Provider {
  hello @0 (core :CoreInfo) -> (provider :ProviderInfo);
  # The handshake. The core calls it first and calls nothing else until it returns. The provider
  # picks the highest protocol version both sides support and describes itself.

  create @1 (request :OperationRequest) -> (result :OperationResult);
  # Creates a resource from `request.inputs`.

  read @2 (request :OperationRequest) -> (result :OperationResult);
  # Reports the current outputs of an existing resource, from `previousInputs` and
  # `previousOutputs`. Must not change anything.

  update @3 (request :OperationRequest) -> (result :OperationResult);
  # Changes an existing resource from its previous inputs/outputs to `inputs`.

  delete @4 (request :OperationRequest) -> (result :OperationResult);
  # Deletes an existing resource, described by `previousInputs` and `previousOutputs`. A
  # successful result carries no outputs.

  shutdown @5 ();
  # Asks the provider to stop: cancel what is in flight, release what it holds, and exit once
  # the core closes the connection. The core follows up with SIGTERM and then SIGKILL if the
  # process does not exit within its grace period.

  plan @6 (request :OperationRequest) -> (result :PlanResult);
  # Asked while planning, only for types that declare `plansChanges`: what a create (empty
  # `previousOutputs`) or an update from the previous inputs and outputs to `inputs` would
  # make, changing nothing. No progress is expected (`request.progress` may be ignored). An
  # older provider answers `unimplemented`; the core then plans without it.

  configure @7 (settings :Text) -> ();
  # The provider's settings for this run (a JSON object), when the deployment can give them
  # only once other resources are made (a Terraform provider block referring to their
  # outputs): called once, before the first operation that needs them. A provider that takes
  # no settings answers `unimplemented`.
}

struct PlanResult {
  union {
    planned @0 :Planned;
    failure @1 :OperationError;
  }

  struct Planned {
    outputs @0 :Text;
    # A JSON object: the outputs as they will be; those known only once the operation runs
    # are null here and named in `unknown`.
    unknown @1 :List(Text);
    # The outputs (top-level names) known only after the operation runs.
    replace @2 :List(Text);
    # For an update: the attributes whose change forces a new resource (the operation will
    # delete it and make it again). Empty: an update in place.
  }
}

struct CoreInfo {
  name @0 :Text;
  # The host program, e.g. "capstan".
  version @1 :Text;
  minProtocol @2 :UInt32;
  maxProtocol @3 :UInt32;
  # The range of protocol versions the core speaks.
  progress @4 :Progress.ProgressHub;
  # Where a provider may open operations' progress sinks on demand (see `ProgressHub`). Null
  # from a core that hands a sink to every request (older cores, other hosts).
}

struct ProviderInfo {
  name @0 :Text;
  version @1 :Text;
  protocol @2 :UInt32;
  # The version chosen for this connection, or 0 if the two ranges do not overlap (the core
  # then closes the connection with a clear error).
  minProtocol @3 :UInt32;
  maxProtocol @4 :UInt32;
  # The range the provider speaks, so an error can say who must upgrade.
  resourceTypes @5 :List(ResourceType);
  maxConcurrency @6 :UInt32;
  # How many operations the provider is willing to run at once; 0 means no limit of its own.
  # The core never sends more concurrent operations than this.
  priorInputsOnce @7 :Bool;
  # True when the provider reads a read's or a delete's inputs from `previousInputs` alone:
  # the core then leaves `inputs` empty for them, so a large resource crosses the connection
  # once less. False (the default, what older providers say): `inputs` repeats them.
  opensProgress @8 :Bool;
  # True when the provider opens its operations' sinks from `CoreInfo.progress`: the core
  # then leaves `OperationRequest.progress` null and numbers each request (`operation`).
  # Only said in answer to a `hello` that offered a hub. False (the default, what older
  # providers say): every request carries its sink.
}

struct ResourceType {
  name @0 :Text;
  description @1 :Text;
  inputs @2 :List(InputSpec);
  outputs @3 :List(OutputSpec);
  # Known before any operation runs, so the core can check references between resources.
  stateful @4 :Bool;
  # True when the resource exists outside the deployment's state (a file, a machine): deleting
  # it matters. False for pure values. Informational today: shown by `capstan provider
  # describe`; the core records, updates and deletes every type alike.
  openInputs @5 :Bool;
  # True when `inputs` is not the whole list: the provider accepts inputs it did not declare and
  # checks them itself (a bridge to a protocol without a handshake, for example).
  noDelete @6 :Bool;
  # True when the provider cannot delete resources of this type; the core says so in plans and
  # refuses to pretend a delete happened.
  readOnPlan @7 :Bool;
  # True when what a resource of this type is can change while its inputs stay the same (a
  # Nix file it builds was edited): the core calls `read` on every recorded resource of the
  # type whose inputs did not change while it plans, and plans an update when the outputs
  # `read` returns differ from those recorded. `read` must then be cheap and change nothing.
  # In a run, the core also updates such a resource when something it waits on changed, even
  # if its inputs come out the same.
  usesScheduler @8 :Bool;
  # True when operations on this type submit children or ask for permits: the core then
  # sets `OperationRequest.scheduler` for them (for other types it leaves it null, which
  # spares a capability per call).
  readChecks @9 :Bool;
  # True when `read` looks at the real resource: it fails with `notFound` when the resource
  # does not exist, and it can find one from its inputs alone (a read whose
  # `previousOutputs` is empty: what an interrupted create may have made). The core checks
  # interrupted operations with it, and `--refresh` finds resources changed or deleted
  # behind its back. False: `read` only echoes what is recorded.
  plansChanges @10 :Bool;
  # True when the provider answers `plan` for this type: `capstan plan` then shows the outputs
  # a create or update will make (and which are known only after it runs) and whether an
  # update replaces the resource. False: the plan shows inputs only.
  readOnly @11 :Bool;
  # True when operations on this type change nothing outside the state (a Terraform data
  # source, a lookup): the core journals no intent before calling it, so one cut short by a
  # crash is never left pending for a person to check; the next run simply does it again.
  # False (the default, what older providers say): every create, update and delete is
  # journaled before the call.
  checksInputs @12 :Bool;
  # True when `plan` checks the inputs of a create or update even for a type that does not
  # declare `plansChanges`: the core then asks it for each while planning, and a `failure`
  # (invalidInput, naming the input) is an error of the plan, as it would be of the apply.
  # For such a type a `planned` answer only says the inputs fit. False (the default, what
  # older providers say): the core asks only types that declare `plansChanges`.
}

struct InputSpec {
  name @0 :Text;
  required @1 :Bool;
  description @2 :Text;
  sensitive @3 :Bool;
  # A secret (a password, a key): the core passes it and stores it in its private state, and
  # shows it nowhere (events, logs, plans, errors, `state show`).
}

struct OutputSpec {
  name @0 :Text;
  description @1 :Text;
  sensitive @2 :Bool;
  # As InputSpec.sensitive: the core hides this output's value wherever it would show it.
  public @3 :Bool;
  # True when this output never carries what the inputs held (an exit status, a count): it is
  # shown even when the operation's inputs hold a secret. False (the default, and what older
  # providers say): when an operation's inputs hold a secret, the core treats this output as
  # sensitive too, since a command may have turned the secret into it (`base64`, `tr`).
  priorUnused @4 :Bool;
  # True when the provider never reads this output back from a request's `previousOutputs`
  # (it repeats an input, which `previousInputs` holds): the core leaves it out of the
  # previous outputs it sends with `read`, `update` and `delete`, so a large value crosses the
  # connection once, not twice. False (the default, what older providers say): sent.
}

struct TraceContext {
  # W3C trace-context compatible identifiers of the operation (`traceparent` is
  # "00-<traceId as 32 hex>-<spanId as 16 hex>-<flags as 2 hex>").
  traceIdHigh @0 :UInt64;
  traceIdLow @1 :UInt64;
  spanId @2 :UInt64;
  # The core's span for this operation; the provider's spans are its children.
  sampled @3 :Bool;
}

struct OperationRequest {
  resourceType @0 :Text;
  address @1 :Text;
  # The resource's address in the deployment, e.g. "web.db". For messages and logs; stable
  # across runs.
  inputs @2 :Text;
  # A JSON object. Set for create and update; for read and delete, the same as previousInputs.
  previousInputs @3 :Text;
  previousOutputs @4 :Text;
  # JSON objects recorded after the last successful operation; empty text on create.
  progress @5 :Progress.ProgressSink;
  # Where this operation's progress goes. Set by the core on every request, except to a
  # provider that said `opensProgress`: then null, and the provider opens the sink from the
  # hub with `operation` when it first has something to report.
  trace @6 :TraceContext;
  capabilities @7 :List(NamedCapability);
  # Handles returned by other resources' operations that this resource's inputs refer to.
  scheduler @8 :Scheduler;
  # Where this operation may hand work back to the core (child resources) and borrow a share
  # of the run's concurrency (permits). Set by cores that support them; null from older cores,
  # so a provider checks before using it.
  silentFinishOptional @9 :Bool;
  # True when this core does not need `progress.finish()` from an operation that pushed no
  # progress at all: for it the result ends the stream, and the provider may skip the call
  # (a round trip saved per operation). False — the default, and what a core that predates
  # this field sends — means `finish()` is required from every operation, as
  # `progress.capnp` says.
  operation @10 :UInt64;
  # The number to open this operation's sink with (`ProgressHub.open`), unique among the
  # connection's running operations; set (non-zero) on a create, read, update or delete
  # exactly when `progress` is null. A `plan` to such a provider carries neither (no
  # progress is expected from a plan).
}

struct NamedCapability {
  name @0 :Text;
  handle @1 :ResourceHandle;
}

interface ResourceHandle {
  # A live reference to something a provider created or manages. A provider returns handles in
  # an operation's result; the core keeps them for the run and can pass them to other
  # operations, in the same provider or another. Providers may return interfaces that extend
  # this one.
  describe @0 () -> (info :HandleInfo);
}

struct HandleInfo {
  kind @0 :Text;
  # What the handle refers to, e.g. "file", "machine".
  address @1 :Text;
  # The resource that created it.
  summary @2 :Text;
  # A JSON value describing it, for display.
}

interface Scheduler {
  # The capability through which an operation asks the core for more work and for a share of
  # the run's concurrency. Valid while the operation runs; calls after it ended fail.

  child @0 (request :ChildRequest) -> (result :OperationResult);
  # Runs a child resource: the core schedules it like any resource (under `--jobs` and its
  # provider's limit; shown, journaled and recorded under "<parent>/<name>") and returns when
  # it ended — its outputs, or why it failed (`cancelled` when the run stopped before it ran).
  # The parent decides what a failed child means. A parent waiting on its children never
  # starves them: its own job (and its provider's permit, for children of the same provider)
  # is lent to one child at a time. A child asked for again with the same inputs is left as
  # recorded; children are deleted before their parent, and cancelled when it is.

  permit @1 () -> (permit :Permit);
  # Waits for one of the run's `--jobs` slots and lends it to the provider, so work it runs
  # internally (builds, machines) counts against the deployment's limit. The operation's own
  # job is lent to its first permit at a time, so asking never deadlocks. The slot comes back
  # on `release`, when the `Permit` is dropped, or when the connection closes. Do not hold a
  # permit while waiting on a child: the child may need that very slot (with `--jobs 1` it
  # does), and the operation then waits until its timeout.
}

struct ChildRequest {
  name @0 :Text;
  # Unique among the parent's children, stable across runs: the child's address is
  # "<parent address>/<name>".
  provider @1 :Text;
  # A provider of the deployment; empty for the parent's own provider.
  resourceType @2 :Text;
  inputs @3 :Text;
  # A JSON object.
}

interface Permit {
  release @0 ();
  # Gives the slot back (dropping the capability does too).
}

struct OperationResult {
  union {
    success @0 :Success;
    failure @1 :OperationError;
  }

  struct Success {
    outputs @0 :Text;
    # A JSON object with the resource's outputs ("{}" when it has none).
    capabilities @1 :List(NamedCapability);
    # Handles to what was created, kept by the core for the rest of the run.
    replaced @2 :Bool;
    # True when, to apply an update, the provider deleted the resource and made it anew (a
    # change it cannot make in place): the core counts a replacement, not an update.
  }
}

struct OperationError {
  kind @0 :ErrorKind;
  message @1 :Text;
  # One line a user can act on.
  details @2 :Text;
  # Longer context: the last lines of a command's output, a backtrace. May be empty.
}

enum ErrorKind {
  # What the core may do about a failure. Unknown values are read as `permanent`.
  permanent @0;
  # Will fail again the same way; a person must change something.
  invalidInput @1;
  # The inputs are wrong: the deployment must change.
  transient @2;
  # May succeed if retried (a network blip, a busy lock).
  cancelled @3;
  # The operation stopped because it was cancelled.
  internal @4;
  # A bug in the provider, such as a panic.
  notFound @5;
  # From `read` only: the resource does not exist (deleted behind the core's back, or never
  # made by an interrupted create).
  settings @6;
  # The provider's own settings are wrong, not this operation's inputs (a Terraform provider
  # block the provider refuses): the core reports it once, for the provider. An older core
  # reads it as `permanent`.
}
