//! Fresh-machine set-up: the nightly's rust-src, bpf-linker built against the nightly's own
//! libLLVM, and a mounted bpffs. See docs/design.md §6 for why each step is needed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::status;

/// The bpf-linker release this crate set works with; newer ones may rename LLVM features.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every set-up step.
pub fn ensure_all() -> Result<()> {
    if prebuilt_ebpf() {
        eprintln!(
            "xtask: HOTSWAP_EBPF=prebuilt: the committed eBPF object is embedded; nightly and \
             bpf-linker are not needed"
        );
    } else {
        ensure_ebpf_toolchain()?;
    }
    ensure_bpffs()?;
    Ok(())
}

/// Whether builds embed the committed eBPF object instead of building it (see hotswap/build.rs).
pub fn prebuilt_ebpf() -> bool {
    std::env::var_os("HOTSWAP_EBPF").is_some_and(|v| v == "prebuilt")
}

/// What building the eBPF program from source needs: nightly's rust-src and bpf-linker.
pub fn ensure_ebpf_toolchain() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// Runs a command and returns what it printed, or fails with its stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed no UTF-8"))
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the eBPF program needs the `nightly` toolchain; install it with `rustup toolchain install nightly`")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("adding rust-src (needed for -Z build-std=core); try `rustup component add rust-src --toolchain nightly`")
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    // bpf-linker has no prebuilt binary reachable here: build it against the nightly's own
    // libLLVM, which has the LLVM major version rustc emits bitcode for.
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` reports no LLVM version")?
        .trim()
        .to_owned();
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let lib = sysroot.join("lib");
    let versioned = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}; is the nightly toolchain complete?",
                lib.display()
            )
        })?;
    let prefix = cache_dir().join(format!("llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    // Both names: `libLLVM.so` for the build, the versioned one so the installed binary finds
    // its library outside rustup's environment.
    for name in ["libLLVM.so", versioned.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&versioned), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    status(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("installing bpf-linker; see docs/design.md §6 for the manual recipe")?;
    if !bpf_linker_ok() {
        bail!("bpf-linker was installed but `bpf-linker --version` does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// Where set-up keeps what it builds or downloads (`~/.cache/hotswap`).
/// A Python virtual environment under [`cache_dir`] named `name`, with `packages` (pinned
/// `name==version` requirements) installed from PyPI where it is missing; returns its path.
/// A half-made environment is removed, so it never passes for a finished one.
pub fn ensure_python_venv(name: &str, packages: &[&str]) -> Result<PathBuf> {
    let venv = cache_dir().join(name);
    let done = venv.join(".installed");
    if done.exists() {
        return Ok(venv);
    }
    eprintln!(
        "xtask: installing {} into {}",
        packages.join(" "),
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    let installed = status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("making a Python virtual environment (needs python3 with venv)")
        .and_then(|()| {
            status(
                Command::new(venv.join("bin").join("pip"))
                    .args(["install", "--quiet"])
                    .args(packages),
            )
            .with_context(|| format!("installing {} from PyPI", packages.join(" ")))
        })
        .and_then(|()| std::fs::write(&done, b"").context("marking the environment made"));
    if installed.is_err() {
        let _ = std::fs::remove_dir_all(&venv);
    }
    installed.map(|()| venv)
}

/// The Python Prometheus client, whose parsers (text format and OpenMetrics) check the
/// daemon's metrics endpoint in `tests/tests/operations.rs`; returns its `python3`.
pub fn ensure_prometheus_parser() -> Result<PathBuf> {
    let venv = ensure_python_venv("prometheus-client-0.21.1", &["prometheus-client==0.21.1"])?;
    Ok(venv.join("bin").join("python3"))
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("hotswap")
}

fn ensure_bpffs() -> Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    eprintln!("xtask: mounting bpffs at /sys/fs/bpf");
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs (needs root): `mount -t bpf bpf /sys/fs/bpf`")
}

/// Installs Debian packages whose binaries are missing (the bench compares hotswap with nginx
/// and HAProxy). Service start-up is suppressed during the install: the packages must not start
/// daemons in the host's namespace.
pub fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, binary)| !Path::new(binary).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let result = status(Command::new("apt-get").arg("update").arg("-q")).and_then(|()| {
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    result.with_context(|| {
        format!(
            "installing {} (apt-get must reach Debian's package registry)",
            missing.join(" ")
        )
    })
}

/// The peers the bench measures hotswap against.
pub const BENCH_PEERS: &[(&str, &str)] = &[
    ("nginx", "/usr/sbin/nginx"),
    ("haproxy", "/usr/sbin/haproxy"),
];

/// The real servers `tests/tests/servers.rs` runs under hotswap (nginx and HAProxy come with
/// the bench's peers), and the interpreter the tests' small helper programs run on (a
/// `READY=1` sender, the control-socket flood client); `setpriv` and `prlimit` are
/// util-linux's, which Debian always has.
pub const TESTED_SERVERS: &[(&str, &str)] = &[
    ("python3-minimal", "/usr/bin/python3"),
    ("uwsgi-core", "/usr/bin/uwsgi"),
    (
        "uwsgi-plugin-python3",
        "/usr/lib/uwsgi/plugins/python3_plugin.so",
    ),
    ("unbound", "/usr/sbin/unbound"),
];

/// What `cargo xtask dist` builds the package with (`dpkg-shlibdeps` computes its `Depends:`)
/// and what `tests/tests/dist.rs` checks it with: systemd's `systemd-analyze verify` for the
/// units, man-db's `man -l` for the man pages, and the three shells with bash-completion for
/// the completions (fish and zsh come to about 20 MB each, installed).
pub const DIST_TOOLS: &[(&str, &str)] = &[
    ("dpkg-dev", "/usr/bin/dpkg-shlibdeps"),
    ("systemd", "/usr/bin/systemd-analyze"),
    ("man-db", "/usr/bin/man"),
    (
        "bash-completion",
        "/usr/share/bash-completion/bash_completion",
    ),
    ("fish", "/usr/bin/fish"),
    ("zsh", "/usr/bin/zsh"),
];
