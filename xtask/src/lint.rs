//! `cargo xtask lint`: the style checks CI runs before the tests — formatting, clippy with
//! warnings as errors, the docs without warnings — and that the user-space crates build with
//! the prebuilt eBPF object (`HOTSWAP_EBPF=prebuilt`) as a contributor without the eBPF
//! toolchain builds them.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{cargo, setup, status};

pub fn run() -> Result<()> {
    ensure_components(&["rustfmt", "clippy"])?;
    // First, as it needs no build: a formatting slip is reported in seconds.
    status(cargo().args(["fmt", "--all", "--check"]))
        .context("the code is not formatted: run `cargo fmt --all`")?;
    if !setup::prebuilt_ebpf() {
        setup::ensure_ebpf_toolchain()?;
    }
    status(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    status(
        cargo()
            .args(["doc", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    // Its own target directory: the main one keeps its eBPF object built from source.
    let target = crate::workspace_root().join("target").join("prebuilt-ebpf");
    status(
        cargo()
            .args(["check", "--package", "hotswap", "--lib", "--target-dir"])
            .arg(&target)
            .env("HOTSWAP_EBPF", "prebuilt"),
    )
    .context(
        "the user-space crates do not build with the prebuilt eBPF object (is it stale? \
         `cargo xtask ebpf-object` renews it)",
    )
}

/// Adds the stable toolchain's components the checks run, where rustup's profile left them
/// out.
fn ensure_components(components: &[&str]) -> Result<()> {
    let installed =
        setup::output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    for component in components {
        if !installed.lines().any(|l| l.starts_with(component)) {
            eprintln!("xtask: adding the {component} component");
            status(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}
