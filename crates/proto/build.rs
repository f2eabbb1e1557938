//! Compiles `proto/` with the protoc binary that ships inside the `protoc-bin-vendored` crate,
//! so building Ordo needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // The manifest dir of THIS build, read at run time: `env!` would bake in the checkout the
    // script was first compiled in, and a shared target dir reuses the script across clones.
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../../proto");
    let public = root.join("ordo/v1/ordo.proto");
    let internal = root.join("ordo/internal/v1/internal.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ordo_v1_descriptor.bin"))
        .bytes(".")
        .codec_path("crate::codec::OrdoCodec")
        .compile_protos(&[public.as_path(), internal.as_path()], &[root.as_path()])?;
    // Relative to this package, so a build in another checkout watches its own protos.
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
