#!/usr/bin/env python3
"""A Capstan provider in Python, on pycapnp (the C++ Cap'n Proto implementation), written from
the published schema alone (schema/provider.capnp, schema/progress.capnp).

It proves the contract is usable from another implementation: the socket-activation hand-off
(LISTEN_FDS/LISTEN_PID, the connection on fd 3), the handshake, operations with JSON inputs and
outputs, and the flow-controlled progress stream.

Resource type `greeting`: input `name` (required), `shout` (optional); output `text`.
Resource type `team`: input `names` (a list); greets each name through a child `greeting`
submitted to the core's scheduler (`OperationRequest.scheduler`, `Scheduler.child`), after
work of its own under a permit (`Scheduler.permit`); output `texts`.
Run it through capstan:  capstan provider call --type greeting --inputs '{"name": "Ada"}' -- python3 provider.py
"""
import asyncio
import json
import os
import socket
import sys
import time

import capnp

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.environ.get("CAPSTAN_SCHEMA_DIR", os.path.join(HERE, "..", "..", "schema"))
capnp.remove_import_hook()
# /usr/include holds capnp/stream.capnp (Debian's libcapnp-dev), needed by `-> stream`.
provider_capnp = capnp.load(os.path.join(SCHEMA, "provider.capnp"), imports=[SCHEMA, "/usr/include"])

PROTOCOL = 1


def log(message):
    print("python provider: " + message, file=sys.stderr, flush=True)


def now_ns():
    return time.time_ns()


class Greeter(provider_capnp.Provider.Server):
    async def hello(self, core, _context, **kwargs):
        info = _context.results.init("provider")
        info.name = "python-greeter"
        info.version = "0.1.0"
        info.minProtocol = PROTOCOL
        info.maxProtocol = PROTOCOL
        info.protocol = PROTOCOL if core.minProtocol <= PROTOCOL <= core.maxProtocol else 0
        types = info.init("resourceTypes", 2)
        greeting = types[0]
        greeting.name = "greeting"
        greeting.description = "A greeting, composed in Python"
        inputs = greeting.init("inputs", 2)
        inputs[0].name, inputs[0].required = "name", True
        inputs[1].name, inputs[1].required = "shout", False
        outputs = greeting.init("outputs", 1)
        outputs[0].name = "text"
        team = types[1]
        team.name = "team"
        team.description = "Greets everyone, each as a child resource"
        team.usesScheduler = True
        team_inputs = team.init("inputs", 1)
        team_inputs[0].name, team_inputs[0].required = "names", True
        team_outputs = team.init("outputs", 1)
        team_outputs[0].name = "texts"
        info.maxConcurrency = 4

    async def _report(self, sink, items):
        request = sink.push_request()
        entries = request.init("items", len(items))
        for entry, (kind, value) in zip(entries, items):
            entry.timeUnixNanos = now_ns()
            if kind == "log":
                entry.init("log").line = value
            elif kind == "phase":
                entry.init("phase").name = value
            elif kind == "counter":
                counter = entry.init("counter")
                counter.done, counter.expected, counter.unit = value[0], value[1], "words"
            elif kind == "span":
                span = entry.init("spanStart")
                span.id, span.parent, span.name, span.target = value, 0, "compose", "python"
            elif kind == "end":
                entry.spanEnd = value
        await request.send()

    async def _operate(self, request, _context):
        sink = request.progress
        result = _context.results.init("result")
        try:
            inputs = json.loads(request.inputs)
        except ValueError as e:
            failure = result.init("failure")
            failure.kind, failure.message = "invalidInput", "inputs are not JSON: %s" % e
            return
        unknown = sorted(set(inputs) - {"name", "shout"})
        if "name" not in inputs or unknown:
            failure = result.init("failure")
            failure.kind = "invalidInput"
            failure.message = "greeting needs `name` and takes only `name` and `shout` (got %s)" % ", ".join(sorted(inputs))
            return
        words = ["Hello,", str(inputs["name"]) + "!"]
        await self._report(sink, [("span", 1), ("phase", "composing")])
        for n, word in enumerate(words, 1):
            await self._report(sink, [("log", "word %d: %s" % (n, word)), ("counter", (n, len(words)))])
            await asyncio.sleep(0.05)
        await self._report(sink, [("end", 1)])
        await sink.finish()
        text = " ".join(words)
        if inputs.get("shout"):
            text = text.upper()
        log("composed %r for %s" % (text, request.address))
        result.init("success").outputs = json.dumps({"text": text})

    async def _child(self, scheduler, name):
        call = scheduler.child_request()
        child = call.init("request")
        child.name = name
        child.provider = ""
        child.resourceType = "greeting"
        child.inputs = json.dumps({"name": name})
        response = await call.send()
        result = response.result
        if result.which() == "success":
            return json.loads(result.success.outputs)["text"]
        raise RuntimeError("child %s failed: %s" % (name, result.failure.message))

    async def _team(self, request, _context):
        result = _context.results.init("result")
        names = json.loads(request.inputs).get("names", [])
        scheduler = request.scheduler
        # Work of our own (checking the names) under a permit, so it counts against the
        # deployment's --jobs; released before waiting on children, which may need that slot.
        permit = (await scheduler.permit_request().send()).permit
        try:
            names = [str(n) for n in names]
            await asyncio.sleep(0.01)
        finally:
            await permit.release_request().send()
        try:
            texts = await asyncio.gather(*(self._child(scheduler, n) for n in names))
        except RuntimeError as e:
            failure = result.init("failure")
            failure.kind, failure.message = "permanent", str(e)
            return
        await request.progress.finish()
        result.init("success").outputs = json.dumps({"texts": list(texts)})

    async def create(self, request, _context, **kwargs):
        if request.resourceType == "team":
            await self._team(request, _context)
        else:
            await self._operate(request, _context)

    async def update(self, request, _context, **kwargs):
        if request.resourceType == "team":
            await self._team(request, _context)
        else:
            await self._operate(request, _context)

    async def read(self, request, _context, **kwargs):
        _context.results.init("result").init("success").outputs = request.previousOutputs

    async def delete(self, request, _context, **kwargs):
        _context.results.init("result").init("success").outputs = "{}"

    async def shutdown(self, _context, **kwargs):
        log("shutdown requested")


def inherited_socket():
    """The connection capstan (or systemd) handed over as fd 3, if it is meant for us."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        return socket.socket(fileno=3)
    return None


async def main():
    sock = inherited_socket()
    if sock is None:
        print("this is a Capstan provider; run it through capstan, e.g.\n"
              "  capstan provider describe -- python3 %s" % sys.argv[0], file=sys.stderr)
        sys.exit(2)
    stream = await capnp.AsyncIoStream.create_connection(sock=sock)
    server = capnp.TwoPartyServer(stream, bootstrap=Greeter())
    log("serving on the inherited socket")
    await server.on_disconnect()


if __name__ == "__main__":
    # The protocol is on fd 3; keep stdout for nothing (stray prints go to stderr).
    os.dup2(2, 1)
    asyncio.run(capnp.run(main()))
