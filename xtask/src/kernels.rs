//! The kernel matrix: a bounded subset of the privileged integration tests, run inside a VM
//! booted with each kernel of [`KERNELS`].
//!
//! The VM is virtme-ng: it boots a kernel image with this host's root file system (read-only,
//! over 9p) as its own, so the guest runs the very test binaries the host suite just built. KVM
//! does not work on the nested machines this project is developed and tested on, so the VM
//! runs under TCG (software emulation): slow, hence the subset and the scaled-down loops
//! (`HOTSWAP_TEST_SLOWDOWN`: loops run that many times fewer rounds, waits may last that
//! many times longer; see `integration_tests::rounds` and `patience`).
//!
//! virtme-ng's exit code does not carry the guest's (without virtio-serial script ports it
//! always exits 255 here), so the guest writes every test binary's output and exit code into
//! a results directory shared read-write with the host; a missing exit code is a failure.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    setup::{self, cache_dir},
    status, Summary,
};

/// A kernel the matrix boots.
pub struct Kernel {
    /// Short name: the results directory and the summary line use it.
    pub name: &'static str,
    /// The Debian package that holds the image (`boot/vmlinuz-*`) and its modules. Use the
    /// generic flavour: the `-cloud-` one has no 9p, which the VM's root file system needs.
    pub package: &'static str,
    /// What it stands for.
    pub about: &'static str,
}

/// The kernels the matrix tests on, beside the host's own. Adding one is one line.
pub const KERNELS: &[Kernel] = &[Kernel {
    name: "debian-12",
    package: "linux-image-6.1.0-47-amd64",
    about: "Debian 12's stock 6.1 (close to Amazon Linux 2023, Ubuntu 22.04/24.04, RHEL 9)",
}];

/// The subset that proves the kernel-facing parts: (integration test target, exact test names).
const SUBSET: &[(&str, &[&str])] = &[
    (
        "steering",
        &[
            "steers_tcp4_tcp6_udp4_udp6",
            "longest_prefix_wins_and_explicit_port_beats_wildcard",
            "ipv6_precedence_and_udp_wildcards",
            "unbound_ports_reach_their_ordinary_listener",
            "bound_without_a_live_socket_is_refused_and_counted",
            "closing_the_active_socket_refuses_at_once",
        ],
    ),
    (
        "switching",
        &[
            "switch_moves_new_connections_and_established_ones_stay",
            "thousand_switches_under_load_lose_nothing",
            "daemon_restart_keeps_steering_and_adopts_the_state",
        ],
    ),
    (
        "lifecycle",
        &[
            "sk_lookup::hundred_upgrades_of_a_server_that_closes_its_listener_on_sigterm_lose_nothing",
            "reuseport::hundred_upgrades_of_a_server_that_shuts_its_listener_down_on_sigterm",
        ],
    ),
    (
        "supervisor",
        &[
            "sk_lookup::twenty_kills_of_the_supervisor_lose_nothing",
            "reuseport::twenty_self_upgrades_of_the_supervisor_lose_nothing",
            "uds::a_stopped_daemon_wedges_nothing",
        ],
    ),
    (
        "reuseport",
        &[
            "members_that_leave_in_any_order_never_misdirect_a_connection",
            "the_reuseport_backend_refuses_what_it_cannot_do",
        ],
    ),
    (
        "backends",
        &[
            "auto_picks_sk_lookup_where_the_program_loads",
            "automatic_fallback_in_a_user_namespace",
            "doctor_says_which_backend_auto_picks_and_why",
        ],
    ),
    (
        "addresses",
        &[
            "every_generation_listens_on_the_service_address_and_nothing_else_does",
            "the_tcp_probe_reaches_the_new_generation_under_a_wildcard_binding_and_is_not_counted",
        ],
    ),
    (
        "doctor",
        &["doctor_without_bpffs_probes_on_a_scratch_one_and_changes_nothing"],
    ),
];

/// How many times slower the tests run under TCG than on the host (measured: the subset's
/// loops take about this much longer); loops are cut by it (100 upgrades become 5) and waits
/// lengthened by it.
const SLOWDOWN: u32 = 20;

/// The most one kernel's run may take before the VM is killed and the run fails.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The virtme-ng release this matrix was measured with.
const VIRTME_NG_VERSION: &str = "1.42";

/// Debian packages the VM needs: qemu, and what virtme-ng builds its initramfs with.
const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("kmod", "/usr/sbin/depmod"),
    ("busybox-static", "/usr/bin/busybox"),
];

/// The names `cargo xtask kernels NAME` and `--kernel NAME` accept.
pub fn names() -> Vec<&'static str> {
    KERNELS.iter().map(|k| k.name).collect()
}

/// Installs what the matrix needs, then runs the subset on every kernel in `only` (all when
/// empty), adding each test's result to `summary`.
pub fn run(only: &[String], summary: &mut Summary) -> Result<()> {
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| only.is_empty() || only.iter().any(|name| name == k.name))
        .collect();
    if let Some(unknown) = only.iter().find(|name| !names().contains(&name.as_str())) {
        bail!(
            "unknown kernel {unknown:?}; the matrix has: {}",
            names().join(", ")
        );
    }
    setup::ensure_debian_packages(VM_PACKAGES)?;
    let vng = ensure_virtme_ng()?;
    let binaries = test_binaries()?;
    let workspace = workspace_root()?;
    for kernel in kernels {
        let image = ensure_kernel(kernel)?;
        let results = workspace
            .join("target")
            .join("kernel-matrix")
            .join(kernel.name);
        let mut kernel_summary = Summary::default();
        let started = Instant::now();
        let outcome = run_subset(&vng, &image, &results, &binaries, &workspace);
        let elapsed = started.elapsed();
        match outcome {
            Ok(outputs) => {
                for (target, expected, exited_cleanly, output) in outputs {
                    println!("---- kernel {}: {target} ----", kernel.name);
                    let mut target_summary = Summary::default();
                    for line in output.lines() {
                        println!("{line}");
                        target_summary.feed(line);
                    }
                    // A test binary that died, or a name that matched nothing, is a failure
                    // too: every listed test must have run.
                    let ran = target_summary.passed + target_summary.failed;
                    if ran != expected as u64 {
                        println!(
                            "xtask: kernel {}: {target} ran {ran} of its {expected} tests",
                            kernel.name
                        );
                        target_summary.broken += 1;
                    } else if !exited_cleanly && target_summary.failed == 0 {
                        // All its tests passed, and then it crashed or was killed.
                        target_summary.broken += 1;
                    }
                    kernel_summary.add(&target_summary);
                }
            }
            Err(err) => {
                println!("kernel {}: {err:#}", kernel.name);
                kernel_summary.broken += 1;
            }
        }
        println!(
            "summary (kernel {}, {}, {} s in the VM): {} passed, {} failed",
            kernel.name,
            image.release,
            elapsed.as_secs(),
            kernel_summary.passed,
            kernel_summary.failed + kernel_summary.broken
        );
        summary.add(&kernel_summary);
    }
    Ok(())
}

/// A kernel image unpacked from its package, with its modules beside it (virtme-ng finds
/// them relative to the image: `<root>/boot/vmlinuz-R` and `<root>/lib/modules/R`).
struct KernelImage {
    vmlinuz: PathBuf,
    release: String,
    about: &'static str,
}

fn ensure_kernel(kernel: &Kernel) -> Result<KernelImage> {
    let dir = cache_dir().join("kernels").join(kernel.package);
    let root = dir.join("root");
    let done = dir.join("unpacked");
    if !done.exists() {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        eprintln!("xtask: downloading {} (about 70 MB)", kernel.package);
        // The package lists may be missing or stale on a fresh machine.
        let download = || {
            status(
                Command::new("apt-get")
                    .arg("download")
                    .arg(kernel.package)
                    .current_dir(&dir),
            )
        };
        if download().is_err() {
            status(Command::new("apt-get").args(["update", "-q"]))?;
            download().with_context(|| {
                format!(
                    "downloading {} from Debian's packages; if the mirror no longer has it, \
                     name a current linux-image-6.1.0-*-amd64 in xtask/src/kernels.rs",
                    kernel.package
                )
            })?;
        }
        let deb = fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        // Unpacked, not installed: the host's /boot and /lib/modules stay as they are.
        status(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        fs::remove_file(&deb)?;
        fs::write(&done, "")?;
    }
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{} holds no boot/vmlinuz-*", kernel.package))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    Ok(KernelImage {
        vmlinuz,
        release,
        about: kernel.about,
    })
}

/// virtme-ng in a private virtual environment; returns the `vng` path (its helpers, such as
/// `virtme-run`, must be on PATH beside it).
fn ensure_virtme_ng() -> Result<PathBuf> {
    let venv = cache_dir().join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    let vng = venv.join("bin").join("vng");
    if vng.exists() {
        return Ok(vng);
    }
    eprintln!(
        "xtask: installing virtme-ng {VIRTME_NG_VERSION} into {}",
        venv.display()
    );
    let _ = fs::remove_dir_all(&venv);
    status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("making a Python virtual environment for virtme-ng (needs python3 with venv)")?;
    status(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )
    .context("installing virtme-ng from PyPI")?;
    Ok(vng)
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask sits in the workspace")?
        .to_owned())
}

/// The integration test executables the host suite built, by target name.
fn test_binaries() -> Result<BTreeMap<String, PathBuf>> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "test",
            "--package",
            "integration-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("building the integration tests")?;
    if !out.status.success() {
        bail!("building the integration tests failed: {}", out.status);
    }
    let mut binaries = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["target"]["kind"][0] != "test" {
            continue;
        }
        if let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            binaries.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(binaries)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots `image`, runs the subset inside, and returns each target's output. A VM that stops
/// before every target has written its exit code (seen once on a loaded host: the guest went
/// down between two test binaries, with nothing on its console) is booted once more for the
/// targets left, and says so; a second stop is a failure.
fn run_subset(
    vng: &Path,
    image: &KernelImage,
    results: &Path,
    binaries: &BTreeMap<String, PathBuf>,
    workspace: &Path,
) -> Result<Vec<(String, usize, bool, String)>> {
    let _ = fs::remove_dir_all(results);
    fs::create_dir_all(results).with_context(|| format!("creating {}", results.display()))?;
    let rc_path = |target: &str| results.join(format!("{target}.rc"));
    for boot in 1..=2 {
        let left: Vec<&(&str, &[&str])> = SUBSET
            .iter()
            .filter(|(target, _)| !rc_path(target).exists())
            .collect();
        if left.is_empty() {
            break;
        }
        if boot > 1 {
            let names: Vec<&str> = left.iter().map(|(t, _)| *t).collect();
            println!(
                "xtask: the VM stopped before {} finished (console: {}); booting it again for them",
                names.join(", "),
                results.join("console-1.log").display()
            );
        }
        boot_once(vng, image, results, binaries, workspace, &left, boot)?;
    }
    let mut outputs = Vec::new();
    for (target, tests) in SUBSET {
        let log = fs::read_to_string(results.join(format!("{target}.log"))).unwrap_or_default();
        let rc = fs::read_to_string(rc_path(target)).unwrap_or_default();
        let mut output = log;
        match rc.trim() {
            "0" => {}
            "" => output += &format!("\nxtask: {target} did not finish in the VM\n"),
            code => output += &format!("\nxtask: {target} exited with {code} in the VM\n"),
        }
        outputs.push((target.to_string(), tests.len(), rc.trim() == "0", output));
    }
    Ok(outputs)
}

/// One boot of `image` that runs `targets`; its console goes to `console-<boot>.log`.
fn boot_once(
    vng: &Path,
    image: &KernelImage,
    results: &Path,
    binaries: &BTreeMap<String, PathBuf>,
    workspace: &Path,
    targets: &[&(&str, &[&str])],
    boot: u32,
) -> Result<()> {
    let mut script = String::from(
        "#!/bin/sh\n# Written by `cargo xtask test`; runs inside the VM.\n\
         mount -t bpf bpf /sys/fs/bpf || exit 1\n",
    );
    script += &format!(
        "cd {} || exit 1\n",
        shell_quote(&workspace.to_string_lossy())
    );
    script += &format!("export HOTSWAP_TEST_SLOWDOWN={SLOWDOWN}\n");
    script += "uname -r > \"$RESULTS/kernel\"\n";
    for (target, tests) in targets {
        let exe = binaries
            .get(*target)
            .with_context(|| format!("no integration test target {target:?}"))?;
        let names: Vec<String> = tests.iter().map(|t| shell_quote(t)).collect();
        script += &format!(
            "{} --exact --test-threads=1 --nocapture {} > \"$RESULTS/{target}.log\" 2>&1\necho $? > \"$RESULTS/{target}.rc\"\n",
            shell_quote(&exe.to_string_lossy()),
            names.join(" ")
        );
    }
    let script_path = results.join(format!("run-{boot}.sh"));
    fs::write(&script_path, script)?;
    let console_path = results.join(format!("console-{boot}.log"));
    let console = fs::File::create(&console_path)?;
    let path = format!(
        "{}:{}",
        vng.parent().context("vng in a bin directory")?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let results_str = results.to_string_lossy();
    eprintln!(
        "xtask: booting {} ({}) under TCG and running the kernel subset (console: {})",
        image.release,
        image.about,
        console_path.display()
    );
    let _ = fs::remove_file(results.join("kernel"));
    let mut child = Command::new(vng)
        .args([
            "--disable-kvm",
            "--cpus",
            "2",
            "--memory",
            "3G",
            "--verbose",
        ])
        .arg("--rwdir")
        .arg(results)
        .arg("-r")
        .arg(&image.vmlinuz)
        .arg("--")
        .arg(format!(
            "RESULTS={} sh {}",
            shell_quote(&results_str),
            shell_quote(&script_path.to_string_lossy())
        ))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // Its own process group, so a timeout takes qemu down with it.
        .process_group(0)
        .spawn()
        .context("starting vng")?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > VM_TIMEOUT {
            // SAFETY: kill(2) on the VM's own process group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "the VM did not finish within {} s (console: {})",
                VM_TIMEOUT.as_secs(),
                console_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let release = fs::read_to_string(results.join("kernel")).unwrap_or_default();
    if release.trim() != image.release {
        bail!(
            "the VM did not run the test script on {} (it reported {:?}; console: {})",
            image.release,
            release.trim(),
            console_path.display()
        );
    }
    Ok(())
}
