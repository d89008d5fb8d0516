//! `hotswap doctor`: what this host offers hotswap, which backend `auto` would choose, and what
//! to change to get sk_lookup. Changes nothing: the probe program it loads is never attached
//! and is gone when the probe ends.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::sk_lookup::{self, SkLookupError, Unavailable, CAP_PERFMON, CAP_SYS_ADMIN};

/// A capability and whether this process holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Name, e.g. `CAP_BPF`.
    pub name: String,
    /// Held in the effective set.
    pub held: bool,
    /// What hotswap needs it for.
    pub needed_for: String,
}

/// The findings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    /// `uname -r`.
    pub kernel: String,
    /// Whether bpffs is mounted at /sys/fs/bpf.
    pub bpffs_mounted: bool,
    /// Whether the probe ran on a scratch bpffs in a private mount namespace, because
    /// /sys/fs/bpf is not one.
    #[serde(default)]
    pub probed_on_scratch_bpffs: bool,
    /// Whether the kernel has BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: bool,
    /// Whether this process runs in a user namespace other than the host's (capabilities there
    /// do not allow loading BPF programs).
    pub user_namespace: bool,
    /// Capabilities that matter.
    pub capabilities: Vec<Capability>,
    /// Whether the sk_lookup program loaded here (it is not attached).
    pub sk_lookup_supported: bool,
    /// Why not, when it did not.
    pub sk_lookup_error: Option<String>,
    /// The verifier's whole log, when the verifier refused the program.
    #[serde(default)]
    pub verifier_log: Option<String>,
    /// Whether the kernel takes a `SO_ATTACH_REUSEPORT_CBPF` program from this process (what
    /// the reuseport backend needs; no capability).
    #[serde(default)]
    pub reuseport_supported: bool,
    /// Why not, when it does not.
    #[serde(default)]
    pub reuseport_error: Option<String>,
    /// `sk_lookup`, `reuseport` or `uds`.
    pub auto_backend: String,
    /// Why.
    pub reason: String,
    /// What to change for sk_lookup, when it is not available.
    pub advice: Vec<String>,
}

const CAP_BPF: &str = "CAP_BPF";
const CAP_NET_ADMIN: &str = "CAP_NET_ADMIN";

const CAPABILITIES: &[(&str, u32, &str)] = &[
    (
        CAP_BPF,
        39,
        "creating BPF maps and loading the sk_lookup program",
    ),
    (
        CAP_NET_ADMIN,
        12,
        "loading and attaching sk_lookup to the network namespace",
    ),
    (
        "CAP_PERFMON",
        CAP_PERFMON,
        "the verifier's privileged rules; without them (and without CAP_SYS_ADMIN) it refuses this program's pointer arithmetic",
    ),
    (
        "CAP_SYS_ADMIN",
        CAP_SYS_ADMIN,
        "mounting bpffs; stands in for CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and BPF needs it on kernels before 5.8",
    ),
    (
        "CAP_SYS_PTRACE",
        19,
        "taking a registered process's socket (pidfd_getfd)",
    ),
];

/// Loads the sk_lookup program without attaching it, to see whether this host allows it. Its
/// maps are declared pinned, so they go to a scratch directory that is removed afterwards.
/// Without bpffs at /sys/fs/bpf the probe mounts a scratch one in a private mount namespace
/// instead (what the daemon would mount, nobody else sees), so a missing mount does not hide
/// what the kernel allows.
fn probe_sk_lookup(bpffs_mounted: bool) -> Result<(), SkLookupError> {
    if !bpffs_mounted {
        return std::thread::spawn(probe_on_scratch_bpffs)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    }
    let scratch =
        std::path::PathBuf::from(format!("/sys/fs/bpf/hotswap-doctor-{}", std::process::id()));
    crate::files::private_dir(&scratch)?;
    let result = sk_lookup::load_program(&scratch).map(drop);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Runs on a thread of its own, which it moves to a new mount namespace: mount namespaces are
/// per thread, and the namespace (with the bpffs and the maps pinned in it) goes with the
/// thread.
fn probe_on_scratch_bpffs() -> Result<(), SkLookupError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let sys_bpf = Path::new("/sys/fs/bpf");
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(SkLookupError::MountBpffs)?;
    // A copy of a shared mount would propagate our mount back to the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(SkLookupError::MountBpffs)?;
    mount(
        Some("bpf"),
        sys_bpf,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(SkLookupError::MountBpffs)?;
    let result = sk_lookup::load_program(sys_bpf).map(drop);
    let _ = umount2(sys_bpf, MntFlags::MNT_DETACH);
    result
}

/// Examines this host.
pub fn examine() -> DoctorReport {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let bpffs_mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
        .is_ok_and(|fs| fs.filesystem_type().0 == 0xcafe_4a11);
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let effective = sk_lookup::effective_capabilities();
    // The initial user namespace maps every uid to itself.
    let user_namespace = std::fs::read_to_string("/proc/self/uid_map")
        .map(|map| map.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
        .unwrap_or(false);
    let capabilities: Vec<Capability> = CAPABILITIES
        .iter()
        .map(|(name, bit, why)| Capability {
            name: (*name).to_owned(),
            held: effective & (1 << bit) != 0,
            needed_for: (*why).to_owned(),
        })
        .collect();
    let probe = probe_sk_lookup(bpffs_mounted);
    let sk_lookup_error = probe.as_ref().err().map(|e| crate::error_chain(e));
    let verifier_log = probe
        .as_ref()
        .err()
        .and_then(SkLookupError::verifier_log)
        .map(str::to_owned);
    let unavailable = probe
        .as_ref()
        .err()
        .and_then(SkLookupError::unavailable_reason);
    let reuseport = crate::backend::reuseport::probe_support();
    let fallback = if reuseport.is_ok() {
        "reuseport"
    } else {
        "uds"
    };
    let reuseport_reason = match &reuseport {
        Ok(()) => "; the kernel takes reuseport programs (no privileges needed)".to_owned(),
        Err(err) => format!("; the kernel refuses reuseport programs ({err})"),
    };
    let (auto_backend, reason) = match (&probe, &unavailable) {
        (Ok(()), _) if !bpffs_mounted => (
            "sk_lookup",
            "the sk_lookup program loads here (probed on a scratch bpffs; the daemon mounts bpffs at /sys/fs/bpf when it starts)".to_owned(),
        ),
        (Ok(()), _) => ("sk_lookup", "the sk_lookup program loads here".to_owned()),
        (Err(_), Some(reason)) => (
            fallback,
            format!("sk_lookup is unavailable: {reason}{reuseport_reason}"),
        ),
        (Err(e), None) => (
            "sk_lookup",
            format!(
                "sk_lookup should work, but the probe failed: {}",
                crate::error_chain(e)
            ),
        ),
    };
    let advice = advise(
        &Findings {
            kernel: &kernel,
            bpffs_mounted,
            btf,
            user_namespace,
            capabilities: &capabilities,
        },
        probe.is_ok(),
        unavailable.as_ref(),
    );
    DoctorReport {
        kernel,
        bpffs_mounted,
        // Not when the scratch mount itself was refused: then nothing was probed.
        probed_on_scratch_bpffs: !bpffs_mounted
            && !matches!(probe, Err(SkLookupError::MountBpffs(_))),
        btf,
        user_namespace,
        capabilities,
        sk_lookup_supported: probe.is_ok(),
        sk_lookup_error,
        verifier_log,
        reuseport_supported: reuseport.is_ok(),
        reuseport_error: reuseport.as_ref().err().map(ToString::to_string),
        auto_backend: auto_backend.to_owned(),
        reason,
        advice,
    }
}

/// What [`advise`] goes by.
struct Findings<'a> {
    kernel: &'a str,
    bpffs_mounted: bool,
    btf: bool,
    user_namespace: bool,
    capabilities: &'a [Capability],
}

/// What to change, from what was found: only what would help, so never "be root" to root.
fn advise(found: &Findings<'_>, loaded: bool, unavailable: Option<&Unavailable>) -> Vec<String> {
    let held = |name: &str| found.capabilities.iter().any(|c| c.name == name && c.held);
    let grant = |name: &str| {
        let cap = found.capabilities.iter().find(|c| c.name == name);
        format!(
            "grant {name} ({})",
            cap.map_or("", |c| c.needed_for.as_str())
        )
    };
    let userns = "run hotswap in the host's user namespace: capabilities held in a user namespace do not allow BPF".to_owned();
    let mut advice = Vec::new();
    if !found.bpffs_mounted {
        advice.push(
            "mount bpffs: mount -t bpf bpf /sys/fs/bpf (the daemon does it when it holds CAP_SYS_ADMIN)"
                .to_owned(),
        );
    }
    if loaded {
        return advice;
    }
    match unavailable {
        Some(Unavailable::VerifierRejected(rejection)) if !rejection.perfmon_capable => {
            advice.push(grant("CAP_PERFMON"));
        }
        Some(Unavailable::VerifierRejected(_)) => advice.push("the kernel's verifier rejected the program — report it with the log from `hotswap doctor --verifier-log`".to_owned()),
        Some(Unavailable::PermissionDenied(_)) if found.user_namespace => advice.push(userns),
        Some(Unavailable::PermissionDenied(_)) => {
            let missing: Vec<String> = [CAP_BPF, CAP_NET_ADMIN, "CAP_PERFMON"]
                .into_iter()
                .filter(|name| !held(name) && !held("CAP_SYS_ADMIN"))
                .map(grant)
                .collect();
            if missing.is_empty() {
                advice.push("the kernel refused although this process holds CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON: a security module (SELinux, AppArmor, lockdown) or a seccomp filter may forbid bpf()".to_owned());
            }
            advice.extend(missing);
        }
        Some(Unavailable::NoBpffs(_)) if found.user_namespace => advice.push(userns),
        Some(Unavailable::NoBpffs(_)) if !held("CAP_SYS_ADMIN") => {
            advice.push(grant("CAP_SYS_ADMIN"));
        }
        Some(Unavailable::NoBpffs(_)) => {}
        Some(Unavailable::UnsupportedKernel(_)) | None => {
            let major_minor: Vec<u32> = found
                .kernel
                .split(['.', '-'])
                .take(2)
                .filter_map(|p| p.parse().ok())
                .collect();
            if major_minor.len() == 2 && (major_minor[0], major_minor[1]) < (5, 9) {
                advice.push("upgrade the kernel to 5.9 or later (sk_lookup programs)".to_owned());
            }
            if !found.btf {
                advice.push("use a kernel built with CONFIG_DEBUG_INFO_BTF".to_owned());
            }
        }
    }
    advice
}

/// The human-readable report.
pub fn render(report: &DoctorReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(out, "kernel:             {}", report.kernel);
    let _ = writeln!(
        out,
        "bpffs at /sys/fs/bpf: {}{}",
        yes(report.bpffs_mounted),
        if report.probed_on_scratch_bpffs {
            " (probed on a scratch bpffs in a private mount namespace)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "BTF:                {}", yes(report.btf));
    let _ = writeln!(out, "user namespace:     {}", yes(report.user_namespace));
    for cap in &report.capabilities {
        let _ = writeln!(
            out,
            "{:<19} {} ({})",
            format!("{}:", cap.name),
            yes(cap.held),
            cap.needed_for
        );
    }
    let _ = writeln!(
        out,
        "sk_lookup:          {}",
        if report.sk_lookup_supported {
            "supported"
        } else {
            "unavailable"
        }
    );
    if let Some(error) = &report.sk_lookup_error {
        let _ = writeln!(out, "  probe error:      {error}");
    }
    if report.verifier_log.is_some() {
        let _ = writeln!(
            out,
            "  verifier log:     `hotswap doctor --verifier-log` prints it whole"
        );
    }
    let _ = writeln!(
        out,
        "reuseport:          {}",
        match &report.reuseport_error {
            None if report.reuseport_supported => "supported (SO_ATTACH_REUSEPORT_CBPF)".to_owned(),
            None => "unavailable".to_owned(),
            Some(error) => format!("unavailable: {error}"),
        }
    );
    let _ = writeln!(
        out,
        "backend (auto):     {} — {}",
        report.auto_backend, report.reason
    );
    for advice in &report.advice {
        let _ = writeln!(out, "to do:              {advice}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sk_lookup::VerifierRejection;
    use nix::errno::Errno;

    fn capabilities(missing: &[&str]) -> Vec<Capability> {
        CAPABILITIES
            .iter()
            .map(|(name, _, why)| Capability {
                name: (*name).to_owned(),
                held: !missing.contains(name),
                needed_for: (*why).to_owned(),
            })
            .collect()
    }

    fn advice_for(
        bpffs_mounted: bool,
        missing: &[&str],
        loaded: bool,
        unavailable: Option<Unavailable>,
    ) -> Vec<String> {
        let capabilities = capabilities(missing);
        advise(
            &Findings {
                kernel: "6.1.0-37-amd64",
                bpffs_mounted,
                btf: true,
                user_namespace: false,
                capabilities: &capabilities,
            },
            loaded,
            unavailable.as_ref(),
        )
    }

    fn rejection(perfmon_capable: bool) -> Unavailable {
        Unavailable::VerifierRejected(VerifierRejection {
            errno: Errno::EACCES,
            log: "0: (b7) r0 = 0\ninvalid read from stack R10 off=-80 size=8\n".to_owned(),
            perfmon_capable,
        })
    }

    #[test]
    fn root_without_bpffs_is_only_told_to_mount_it() {
        let advice = advice_for(false, &[], true, None);
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(advice[0].starts_with("mount bpffs"), "{advice:?}");
    }

    #[test]
    fn a_verifier_refusal_with_every_capability_is_reported_as_one() {
        let advice = advice_for(true, &[], false, Some(rejection(true)));
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(
            advice[0].contains("verifier rejected")
                && advice[0].contains("hotswap doctor --verifier-log"),
            "{advice:?}"
        );
    }

    #[test]
    fn a_refusal_under_the_unprivileged_rules_asks_for_cap_perfmon_only() {
        let advice = advice_for(
            true,
            &["CAP_PERFMON", "CAP_SYS_ADMIN"],
            false,
            Some(rejection(false)),
        );
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(advice[0].starts_with("grant CAP_PERFMON"), "{advice:?}");
    }

    #[test]
    fn permission_denied_names_the_missing_capabilities_and_never_says_root() {
        let advice = advice_for(
            true,
            &["CAP_BPF", "CAP_SYS_ADMIN"],
            false,
            Some(Unavailable::PermissionDenied(Errno::EPERM)),
        );
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(advice[0].starts_with("grant CAP_BPF"), "{advice:?}");
        // With every capability the kernel still refused: something else forbids it.
        let advice = advice_for(
            true,
            &[],
            false,
            Some(Unavailable::PermissionDenied(Errno::EPERM)),
        );
        assert_eq!(advice.len(), 1, "{advice:?}");
        assert!(advice[0].contains("security module"), "{advice:?}");
        assert!(!advice.iter().any(|a| a.contains("root")), "{advice:?}");
    }
}
