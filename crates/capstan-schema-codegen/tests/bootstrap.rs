//! Regenerates the Rust bindings from `schema/*.capnp` and fails if they differ from the
//! checked-in copies in `crates/capstan-schema/src/generated/`, so the two never drift apart.
//! To update the checked-in code after changing a schema: `bash schema/regenerate.sh`.

#[test]
fn checked_in_bindings_match_the_schema() {
    if !capstan_schema_codegen::compiler_available() {
        let message = "\n\
            ==================================================================\n\
            COULD NOT CHECK the generated Cap'n Proto code against schema/:\n\
            the `capnp` compiler is not installed. Install it with\n\
            \n    apt-get install -y capnproto libcapnp-dev\n\n\
            ==================================================================\n";
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{message}(a missing compiler is a failure under CI)");
        }
        eprintln!("{message}");
        return;
    }
    let files = capstan_schema_codegen::generate().unwrap_or_else(|e| panic!("{e}"));
    let dir = capstan_schema_codegen::generated_dir();
    let drifted: Vec<String> = files
        .iter()
        .filter(|file| {
            std::fs::read_to_string(dir.join(&file.name))
                .ok()
                .as_deref()
                != Some(file.contents.as_str())
        })
        .map(|file| file.name.clone())
        .collect();
    assert!(
        drifted.is_empty(),
        "the checked-in bindings {drifted:?} in crates/capstan-schema/src/generated/ do not \
         match schema/*.capnp. Run `bash schema/regenerate.sh` and commit the result."
    );
}
