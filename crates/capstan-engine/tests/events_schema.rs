//! `schema/events.schema.json` is generated from the event types: this test fails when the
//! checked-in file differs from what the types say (as the capnp bindings' drift test does).
//! `CAPSTAN_BLESS=1 cargo test -p capstan-engine --test events_schema` writes it anew.

use std::path::Path;

#[test]
fn the_event_stream_schema_is_what_the_types_say() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema/events.schema.json");
    let generated =
        serde_json::to_string_pretty(&capstan_engine::events::stream_schema()).unwrap() + "\n";
    if std::env::var_os("CAPSTAN_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is not what the event types say: run `CAPSTAN_BLESS=1 cargo test -p capstan-engine \
         --test events_schema` and review the diff",
        path.display()
    );
}
