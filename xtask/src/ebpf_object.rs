//! `cargo xtask ebpf-object`: builds the eBPF program from source and renews the prebuilt
//! object that `HOTSWAP_EBPF=prebuilt` builds embed (`hotswap/ebpf-prebuilt/`), with the stamp
//! of the sources it came from.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, setup};

/// Where the prebuilt object and its stamp live, relative to the workspace.
const PREBUILT_DIR: &str = "hotswap/ebpf-prebuilt";

pub fn run() -> Result<()> {
    setup::ensure_ebpf_toolchain()?;
    let out_dir = build_from_source()?;
    let dir = crate::workspace_root().join(PREBUILT_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (from, to) in [
        ("hotswap", "hotswap.bpf.o"),
        ("hotswap.sources-sha256", "hotswap.bpf.o.sources-sha256"),
    ] {
        let (from, to) = (out_dir.join(from), dir.join(to));
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    println!("{}", dir.join("hotswap.bpf.o").display());
    Ok(())
}

/// Builds the hotswap library with the eBPF program built from source; returns its build
/// script's output directory, which holds the object and its sources' digest.
fn build_from_source() -> Result<PathBuf> {
    let mut build = cargo();
    build
        .args([
            "build",
            "--package",
            "hotswap",
            "--lib",
            "--message-format=json-render-diagnostics",
        ])
        .env("HOTSWAP_EBPF", "build")
        .stderr(Stdio::inherit());
    let printed = setup::output(&mut build)?;
    let out_dir = printed
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "build-script-executed")
        .filter(|message| is_hotswap(message["package_id"].as_str().unwrap_or_default()))
        .filter_map(|message| message["out_dir"].as_str().map(PathBuf::from))
        .next_back();
    match out_dir {
        Some(dir) if Path::new(&dir).join("hotswap").is_file() => Ok(dir),
        Some(dir) => bail!("the build left no eBPF object in {}", dir.display()),
        None => bail!("cargo reported no build script run for the hotswap package"),
    }
}

/// Whether a cargo package id (`path+file:///…/hotswap#0.1.0`) is the hotswap crate's.
fn is_hotswap(package_id: &str) -> bool {
    package_id
        .rsplit_once('#')
        .is_some_and(|(path, _)| path.ends_with("/hotswap"))
}
