//! `cargo run -p capstan-schema-codegen`: rewrites the checked-in bindings from `schema/`.

#![forbid(unsafe_code)]

fn main() {
    if !capstan_schema_codegen::compiler_available() {
        eprintln!(
            "error: the `capnp` compiler is not installed.\n\
             Install it with: apt-get install -y capnproto libcapnp-dev"
        );
        std::process::exit(2);
    }
    let files = match capstan_schema_codegen::generate() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let dir = capstan_schema_codegen::generated_dir();
    for file in files {
        let path = dir.join(&file.name);
        let unchanged = std::fs::read_to_string(&path).is_ok_and(|old| old == file.contents);
        if !unchanged {
            if let Err(e) = std::fs::write(&path, &file.contents) {
                eprintln!("error: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
        }
        eprintln!(
            "{} {}",
            if unchanged {
                "unchanged  "
            } else {
                "regenerated"
            },
            path.display()
        );
    }
}
