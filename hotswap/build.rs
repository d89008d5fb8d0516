//! Embeds the eBPF program for `include_bytes_aligned!`: built from `hotswap-ebpf` with the
//! nightly toolchain (aya-build), or, with `HOTSWAP_EBPF=prebuilt`, the object committed in
//! `ebpf-prebuilt/` — so a contributor to the user-space crates needs neither nightly nor
//! bpf-linker. The prebuilt object is refused when the eBPF sources are not the ones it was
//! built from: its stamp holds their digest, and `cargo xtask ebpf-object` renews both.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context as _, Result};
use sha2::{Digest as _, Sha256};

const PREBUILT_OBJECT: &str = "ebpf-prebuilt/hotswap.bpf.o";
const PREBUILT_STAMP: &str = "ebpf-prebuilt/hotswap.bpf.o.sources-sha256";

/// The crates whose sources make the object.
const SOURCE_CRATES: [&str; 2] = ["hotswap-ebpf", "hotswap-common"];

/// The packages compiled into the object, by name prefix: their entries in Cargo.lock (version
/// and checksum) go into the digest.
const SOURCE_DEPENDENCIES: [&str; 3] = ["aya-ebpf", "aya-log-ebpf", "aya-log-common"];

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().context("the workspace directory")?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is unset")?);
    println!("cargo:rerun-if-env-changed=HOTSWAP_EBPF");
    let mode = env::var("HOTSWAP_EBPF");
    // The unit test comparing the prebuilt object with the built one knows which it embeds.
    let embedded = if mode.as_deref() == Ok("prebuilt") {
        "prebuilt"
    } else {
        "built"
    };
    println!("cargo:rustc-env=HOTSWAP_EBPF_EMBEDDED={embedded}");

    let digest = source_digest(workspace)?;
    // The unit tests compare it with the committed stamp; `cargo xtask ebpf-object` copies it.
    println!("cargo:rustc-env=HOTSWAP_EBPF_SOURCE_DIGEST={digest}");
    fs::write(
        out_dir.join("hotswap.sources-sha256"),
        format!("{digest}\n"),
    )?;

    match mode.as_deref() {
        Ok("prebuilt") => {
            println!("cargo:rerun-if-changed={PREBUILT_OBJECT}");
            println!("cargo:rerun-if-changed={PREBUILT_STAMP}");
            let stamp_path = manifest_dir.join(PREBUILT_STAMP);
            let stamp = fs::read_to_string(&stamp_path)
                .with_context(|| format!("reading {}", stamp_path.display()))?;
            ensure!(
                stamp.trim() == digest,
                "HOTSWAP_EBPF=prebuilt: hotswap/{PREBUILT_OBJECT} was built from other eBPF \
                 sources than these (hotswap-ebpf, hotswap-common changed): build with the eBPF \
                 toolchain (unset HOTSWAP_EBPF) and renew it with `cargo xtask ebpf-object`"
            );
            let object = manifest_dir.join(PREBUILT_OBJECT);
            fs::copy(&object, out_dir.join("hotswap"))
                .with_context(|| format!("copying {}", object.display()))?;
            Ok(())
        }
        Ok("build") | Err(env::VarError::NotPresent) => aya_build::build_ebpf(
            [aya_build::Package {
                name: "hotswap-ebpf",
                root_dir: workspace
                    .join("hotswap-ebpf")
                    .to_str()
                    .context("a UTF-8 path")?,
                ..Default::default()
            }],
            aya_build::Toolchain::Nightly,
        ),
        Ok(other) => bail!("HOTSWAP_EBPF={other:?}: expected `build` (the default) or `prebuilt`"),
        Err(env::VarError::NotUnicode(other)) => {
            bail!("HOTSWAP_EBPF={other:?}: expected `build` (the default) or `prebuilt`")
        }
    }
}

/// SHA-256 over the sources of [`SOURCE_CRATES`] (their manifests and `.rs` files: path and
/// contents, in path order), the Cargo.lock entries of [`SOURCE_DEPENDENCIES`], the
/// workspace's `[profile…]` sections and the target architecture; asks cargo to rerun when any
/// of them changes. Only tracked kinds of file count, so a stray file in a crate changes
/// nothing.
fn source_digest(workspace: &Path) -> Result<String> {
    let mut files = Vec::new();
    for krate in SOURCE_CRATES {
        println!("cargo:rerun-if-changed=../{krate}");
        collect_files(workspace, &workspace.join(krate), &mut files)?;
    }
    files.sort();
    let mut hasher = Sha256::new();
    for relative in &files {
        let contents = fs::read(workspace.join(relative))
            .with_context(|| format!("reading {}", relative.display()))?;
        hasher.update(relative.to_str().context("a UTF-8 path")?.as_bytes());
        hasher.update([0]);
        hasher.update((contents.len() as u64).to_le_bytes());
        hasher.update(&contents);
    }
    println!("cargo:rerun-if-changed=../Cargo.lock");
    let lock = fs::read_to_string(workspace.join("Cargo.lock"))?;
    for package in lock.split("\n[[package]]\n") {
        let name = package
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .unwrap_or_default()
            .trim_matches('"');
        if SOURCE_DEPENDENCIES.iter().any(|dep| name.starts_with(dep)) {
            hasher.update(package.trim().as_bytes());
            hasher.update([0]);
        }
    }
    println!("cargo:rerun-if-changed=../Cargo.toml");
    let manifest = fs::read_to_string(workspace.join("Cargo.toml"))?;
    let mut in_profile = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_profile = line.starts_with("[profile");
        }
        if in_profile {
            hasher.update(line.trim().as_bytes());
            hasher.update([b'\n']);
        }
    }
    hasher.update(env::var("CARGO_CFG_TARGET_ARCH")?.as_bytes());
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// The manifest and `.rs` files under `dir`, relative to `workspace`; build output (`target`)
/// is not source.
fn collect_files(workspace: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if entry.file_name() != "target" {
                collect_files(workspace, &path, files)?;
            }
        } else if entry.file_name() == "Cargo.toml" || path.extension() == Some("rs".as_ref()) {
            files.push(path.strip_prefix(workspace)?.to_owned());
        }
    }
    Ok(())
}
