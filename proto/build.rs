fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: the build needs no system protobuf compiler.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Maps encode in key order, so every master writes the same bytes for the same state.
    config.btree_map(["."]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/cairn.proto", "proto/data.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
