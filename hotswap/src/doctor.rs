//! `hotswap doctor`: what this host offers hotswap, which backend `auto` would choose, and what
//! to change to get sk_lookup. Changes nothing: the probe program it loads is never attached
//! and is gone when the probe ends.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::sk_lookup::{SkLookupError, PROGRAM_NAME, PROGRAM_OBJECT};

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
    /// `sk_lookup` or `uds`.
    pub auto_backend: String,
    /// Why.
    pub reason: String,
    /// What to change for sk_lookup, when it is not available.
    pub advice: Vec<String>,
}

const CAPABILITIES: &[(&str, u32, &str)] = &[
    (
        "CAP_BPF",
        39,
        "creating BPF maps and loading the sk_lookup program",
    ),
    (
        "CAP_NET_ADMIN",
        12,
        "attaching sk_lookup to the network namespace",
    ),
    (
        "CAP_SYS_ADMIN",
        21,
        "mounting bpffs, and BPF on kernels before 5.8",
    ),
    (
        "CAP_SYS_PTRACE",
        19,
        "taking a registered process's socket (pidfd_getfd)",
    ),
];

fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Loads the sk_lookup program without attaching it, to see whether this host allows it. Its
/// maps are declared pinned, so they go to a scratch directory that is removed afterwards.
fn probe_sk_lookup() -> Result<(), SkLookupError> {
    let scratch =
        std::path::PathBuf::from(format!("/sys/fs/bpf/hotswap-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(crate::PathError::at("creating", &scratch))?;
    let result = (|| {
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&scratch)
            .load(PROGRAM_OBJECT)
            .map_err(|e| SkLookupError::Load(Box::new(e)))?;
        let program: &mut aya::programs::SkLookup = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(SkLookupError::Program {
                what: "finding",
                source: Box::new(aya::programs::ProgramError::NotLoaded),
            })?
            .try_into()
            .map_err(|e| SkLookupError::Program {
                what: "finding",
                source: Box::new(e),
            })?;
        program.load().map_err(|e| SkLookupError::Program {
            what: "verifying",
            source: Box::new(e),
        })
    })();
    let _ = std::fs::remove_dir_all(&scratch);
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
    let effective = effective_capabilities();
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
    // Without bpffs there is nowhere to put the probe's maps; the daemon mounts it at start.
    let probe = if bpffs_mounted {
        probe_sk_lookup()
    } else {
        Err(SkLookupError::NotBpffs("/sys/fs/bpf".into()))
    };
    let sk_lookup_error = probe.as_ref().err().map(|e| crate::error_chain(e));
    let unavailable = probe
        .as_ref()
        .err()
        .and_then(SkLookupError::unavailable_reason);
    let (auto_backend, reason) = match (&probe, &unavailable) {
        (Ok(()), _) => ("sk_lookup", "the sk_lookup program loads here".to_owned()),
        (Err(_), Some(reason)) => ("uds", format!("sk_lookup is unavailable: {reason}")),
        (Err(e), None) => (
            "sk_lookup",
            format!(
                "sk_lookup should work, but the probe failed: {}",
                crate::error_chain(e)
            ),
        ),
    };
    let mut advice = Vec::new();
    if probe.is_err() {
        if user_namespace {
            advice.push("run hotswap in the host's user namespace: capabilities held in a user namespace do not allow BPF".to_owned());
        }
        for cap in capabilities
            .iter()
            .filter(|c| !c.held && c.name != "CAP_SYS_PTRACE")
        {
            advice.push(format!("grant {} ({})", cap.name, cap.needed_for));
        }
        let major_minor: Vec<u32> = kernel
            .split(['.', '-'])
            .take(2)
            .filter_map(|p| p.parse().ok())
            .collect();
        if major_minor.len() == 2 && (major_minor[0], major_minor[1]) < (5, 9) {
            advice.push("upgrade the kernel to 5.9 or later (sk_lookup programs)".to_owned());
        }
        if !btf {
            advice.push("use a kernel built with CONFIG_DEBUG_INFO_BTF".to_owned());
        }
        if advice.is_empty() {
            advice.push("run hotswap as root".to_owned());
        }
    }
    if !bpffs_mounted {
        advice.push(
            "mount bpffs: mount -t bpf bpf /sys/fs/bpf (the daemon does it when it can)".to_owned(),
        );
    }
    DoctorReport {
        kernel,
        bpffs_mounted,
        btf,
        user_namespace,
        capabilities,
        sk_lookup_supported: probe.is_ok(),
        sk_lookup_error,
        auto_backend: auto_backend.to_owned(),
        reason,
        advice,
    }
}

/// The human-readable report.
pub fn render(report: &DoctorReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(out, "kernel:             {}", report.kernel);
    let _ = writeln!(out, "bpffs at /sys/fs/bpf: {}", yes(report.bpffs_mounted));
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
