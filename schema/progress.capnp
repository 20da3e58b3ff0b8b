@0xebde82286db3ecaa;
# Capstan progress protocol: how a provider reports what it is doing while an operation runs.
#
# Every operation has a `ProgressSink` (see `provider.capnp`): the core hands it over with the
# request, or the provider opens it from the connection's `ProgressHub`. The provider pushes
# batches of `ProgressItem`s into it with a flow-controlled `-> stream` call, so a slow consumer
# slows the provider down instead of growing anyone's memory, and ends with `finish()`, a plain
# call whose result surfaces any error the stream hit.
#
# Evolution rules (see also `schema/EVOLUTION.md`): fields and union variants are only ever
# added, never renumbered, renamed in meaning or removed. A consumer that meets a `ProgressItem`
# variant it does not know skips that item; an unknown `Level` is treated as `info`.

struct Field {
  # One key/value pair attached to a span or an event (tracing's "fields").
  name @0 :Text;
  value @1 :Text;
  # Rendered as text by the producer: numbers and booleans as their literal spelling, strings
  # as-is, anything structured as JSON.
}

enum Level {
  # Severity, in tracing's order. Unknown values are read as `info`.
  info @0;
  trace @1;
  debug @2;
  warn @3;
  error @4;
}

enum LogStream {
  # Where a raw log line came from.
  stdout @0;
  stderr @1;
  other @2;
}

struct ProgressItem {
  # One thing that happened. `span` fields name a span started earlier in the same operation's
  # stream with `spanStart`; 0 means "the operation itself" (the root of the tree).

  timeUnixNanos @0 :UInt64;
  # When it happened, by the provider's clock (nanoseconds since the Unix epoch); 0 if unknown.

  union {
    spanStart @1 :SpanStart;
    spanEnd @2 :UInt64;
    # The id of the span that ended. Every id is unique within one operation and never reused.
    event @3 :Event;
    log @4 :LogLine;
    counter @5 :Counter;
    phase @6 :Phase;
  }

  struct SpanStart {
    id @0 :UInt64;
    # Non-zero; unique within the operation. Compatible with a W3C trace-context span id.
    parent @1 :UInt64;
    # 0 when the span hangs directly under the operation.
    name @2 :Text;
    level @3 :Level;
    fields @4 :List(Field);
    target @5 :Text;
    # The module or component that opened the span (tracing's target); may be empty.
  }

  struct Event {
    span @0 :UInt64;
    level @1 :Level;
    message @2 :Text;
    fields @3 :List(Field);
    target @4 :Text;
  }

  struct LogLine {
    span @0 :UInt64;
    stream @1 :LogStream;
    line @2 :Text;
    # One line, without its terminating newline.
  }

  struct Counter {
    span @0 :UInt64;
    done @1 :UInt64;
    expected @2 :UInt64;
    # 0 means "not known yet".
    unit @3 :Text;
    # What is being counted, e.g. "bytes", "paths", "steps"; may be empty.
  }

  struct Phase {
    span @0 :UInt64;
    name @1 :Text;
    # A short human phase name such as "building" or "activating".
  }
}

interface ProgressSink {
  # Receives the progress of one operation. Created by the core per operation: handed over in
  # the request (`OperationRequest.progress`), or opened by the provider from the connection's
  # `ProgressHub` when the operation first has something to report.

  push @0 (items :List(ProgressItem)) -> stream;
  # Delivers a batch of items in order. Flow-controlled: the provider must await each call
  # before it is allowed to have more than the connection's window in flight.

  finish @1 ();
  # Ends the stream. Returns the first error any `push` hit, if there was one. Required: a
  # provider calls it exactly once per operation, after its last `push` and before it returns
  # the operation's result — also when it pushed nothing, after a failed `push`, and when it
  # refuses the operation before running it (a type it does not serve, a provider shutting
  # down). A host may wait for it before taking the result. (The one exception: a request with
  # `silentFinishOptional` set lets an operation that pushed nothing skip it.) When the core
  # cancels the call itself (it drops the request: a timeout, an interrupt), it has stopped
  # reading the stream and waits for nothing: `finish()` is then not required, and a provider
  # may stop pushing at once. An operation the provider ends as cancelled on its own (it saw
  # its cancellation and returned) still returns a result, and so calls `finish()` first.
}

interface ProgressHub {
  # The connection's source of progress sinks, offered by the core in `hello`
  # (`CoreInfo.progress`). A provider that says `ProviderInfo.opensProgress` gets requests
  # without a sink, each with an `OperationRequest.operation` number, and opens a sink here
  # only for an operation that reports something: an operation that reports nothing then
  # costs its call and nothing more (no capability made, sent and released per call).

  open @0 (operation :UInt64) -> (sink :ProgressSink);
  # The sink of the running operation numbered `operation`, to be used as
  # `OperationRequest.progress` would be (push, then `finish()`). Opened at most once per
  # operation; the provider may pipeline its first `push` on the result. Fails for a number
  # that is not a running operation of this connection.
}
