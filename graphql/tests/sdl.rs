//! The checked-in SDL is the API contract: this fails when code and file disagree.
//! Run with `UPDATE_SCHEMA=1` to rewrite the file after an intended change.

#[test]
fn checked_in_sdl_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let sdl = drover_graphql::schema::schema_sdl();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &sdl).expect("write schema.graphql");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == sdl,
        "graphql/schema.graphql differs from the schema in code; if the change is intended, run \
         `UPDATE_SCHEMA=1 cargo test -p drover-graphql --test sdl` and commit the file"
    );
}

#[test]
fn contract_names_are_present() {
    let sdl = drover_graphql::schema::schema_sdl();
    for field in [
        "fleet: Fleet!",
        "clusters(",
        "cluster(name: String!)",
        "virtualMachines(",
        "virtualMachine(cluster: String!, namespace: String!, name: String!)",
        "migrations(",
        "migration(id: ID!)",
        "completionTimeoutPerGiB",
        "traceId",
    ] {
        assert!(sdl.contains(field), "schema lacks {field}");
    }
}
