#!/usr/bin/env bash
# Regenerates crates/capstan-schema/src/generated/ from schema/*.capnp.
# Needs the Cap'n Proto compiler: apt-get install -y capnproto libcapnp-dev
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p capstan-schema-codegen
