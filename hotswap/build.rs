//! Builds the eBPF program with the nightly toolchain (aya-build) so `include_bytes_aligned!`
//! can embed it.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../hotswap-common/src");
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../hotswap-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "hotswap-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
