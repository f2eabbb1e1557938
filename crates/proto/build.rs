//! Compiles `proto/` with the protoc binary that ships inside the `protoc-bin-vendored` crate,
//! so building Ordo needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let public = root.join("ordo/v1/ordo.proto");
    let internal = root.join("ordo/internal/v1/internal.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ordo_v1_descriptor.bin"))
        .bytes(".")
        .compile_protos(&[public.as_path(), internal.as_path()], &[root.as_path()])?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
