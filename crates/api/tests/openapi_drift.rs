//! The checked-in `openapi.json` (repository root) must equal the document generated from the
//! code.

#[test]
fn checked_in_openapi_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.json");
    let generated = api::openapi::document_json();
    if std::env::var_os("VIRIDIAN_WRITE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi.json differs from the API in crates/api; regenerate it with \
         `VIRIDIAN_WRITE_OPENAPI=1 cargo test -p api --test openapi_drift` and commit it"
    );
}
