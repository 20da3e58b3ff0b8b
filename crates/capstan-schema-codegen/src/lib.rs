//! Regenerates `crates/capstan-schema/src/generated/` from `schema/*.capnp`.
//!
//! This is a separate crate from `capstan-schema` so that it builds even when the checked-in
//! bindings are missing or broken. It needs the Cap'n Proto compiler
//! (`apt-get install -y capnproto libcapnp-dev`); nothing else in the workspace does.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The schema files, relative to `schema/`.
pub const SCHEMAS: &[&str] = &["progress.capnp", "provider.capnp"];

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the checked-in bindings live.
pub fn generated_dir() -> PathBuf {
    workspace_root().join("crates/capstan-schema/src/generated")
}

/// Whether the `capnp` compiler can be run.
pub fn compiler_available() -> bool {
    Command::new("capnp")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// One generated file: its name under `src/generated/` and its fresh contents.
pub struct GeneratedFile {
    pub name: String,
    pub contents: String,
}

/// Compiles every schema into a temporary directory and returns the generated Rust files.
pub fn generate() -> Result<Vec<GeneratedFile>, String> {
    let schema_dir = workspace_root().join("schema");
    let out = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(&schema_dir).output_path(out.path());
    for schema in SCHEMAS {
        cmd.file(schema_dir.join(schema));
    }
    cmd.run().map_err(|e| {
        format!(
            "capnp failed to compile schema/: {e}\n\
             (a schema using `-> stream` also needs `apt-get install -y libcapnp-dev`)"
        )
    })?;
    SCHEMAS
        .iter()
        .map(|schema| {
            let name = schema.replace(".capnp", "_capnp.rs");
            let contents = std::fs::read_to_string(out.path().join(&name))
                .map_err(|e| format!("capnpc produced no {name}: {e}"))?;
            Ok(GeneratedFile { name, contents })
        })
        .collect()
}
