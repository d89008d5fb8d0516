//! The sk_lookup backend: the eBPF program, its maps and its link, pinned in bpffs.
//!
//! Layout of the state directory (one per network namespace):
//! `HS_*` (maps, pinned by name), `program` (the attached program) and `link` (the link that
//! attaches it to the namespace). The link's pin is what keeps steering alive when no daemon
//! runs; a restarted daemon finds it and adopts the state instead of attaching a second program.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues,
        SockHash,
    },
    programs::{
        links::{FdLink, PinnedLink},
        ProgramError, ProgramInfo, SkLookup,
    },
    Ebpf, EbpfLoader,
};
use hotswap_common::{
    map_names, BindingData, BindingValue, GenerationKey, GenerationRecord, OwnerRecord, ProbeKey,
    ServiceMetrics, ServiceRecord, SocketKey, CONFIG_CHECK, CONFIG_DEBUG_LOG, CONFIG_PROBES,
};
use nix::fcntl::Flock;

use super::{
    Backend, BackendError, BackendInfo, Capabilities, PersistedState, SocketSource, Steered,
    Support,
};
use crate::model::{Binding, Protocol};
use crate::PathError;

/// The compiled sk_lookup program, built by `build.rs`.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hotswap"));

/// The program's function name in the object file.
pub const PROGRAM_NAME: &str = "hotswap_steer";

/// bpffs's magic number (`statfs.f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The calling thread's network namespace: the one the program is attached to.
pub const NETNS_PATH: &str = "/proc/thread-self/ns/net";

/// Map update flag: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// The sk_lookup backend failed.
#[derive(Debug, thiserror::Error)]
pub enum SkLookupError {
    /// The state directory is not on a bpf filesystem.
    #[error("{0} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs(PathBuf),
    /// Mounting bpffs at /sys/fs/bpf failed.
    #[error("mounting bpffs at /sys/fs/bpf failed")]
    MountBpffs(#[source] nix::Error),
    /// The state directory belongs to a live network namespace other than the daemon's.
    #[error("pin dir {path} holds the state of network namespace {owner}, not of this one ({ours}); use the default pin dir or another --pin-dir")]
    ForeignNetns {
        /// The state directory.
        path: PathBuf,
        /// Inode of the namespace its link is attached to.
        owner: u32,
        /// Inode of the daemon's namespace.
        ours: u64,
    },
    /// Creating maps or loading programs is not allowed.
    #[error("the kernel refused to create BPF maps or load the program (EPERM): hotswap needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")]
    PermissionDenied(#[source] Box<aya::EbpfError>),
    /// The kernel's verifier refused the program (`BPF_PROG_LOAD` failed with a log).
    #[error("{0}")]
    VerifierRejected(VerifierRejection),
    /// Another daemon holds the state directory.
    #[error("another hotswap daemon{} is already running on pin dir {}", crate::files::held_by(holder), path.display())]
    Locked {
        /// The pin dir.
        path: PathBuf,
        /// The pid holding its lock, when the kernel says.
        holder: Option<u32>,
    },
    /// The pin dir, or a directory on the way to it, is not hotswap's alone.
    #[error("the pin dir cannot be used")]
    PinDir(#[from] crate::files::PrivateDirError),
    /// A file-system or socket operation failed.
    #[error(transparent)]
    Io(#[from] crate::PathError),
    /// Reading back which socket a service is steered to (`BPF_PROG_TEST_RUN`) failed.
    #[error("reading back which socket the kernel steers service id {service_id} to failed (BPF_PROG_TEST_RUN)")]
    ReadBack {
        /// The service.
        service_id: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Loading the object file or creating its maps failed.
    #[error("loading the sk_lookup program failed")]
    Load(#[source] Box<aya::EbpfError>),
    /// Verifying, attaching or inspecting the program failed.
    #[error("{what} the sk_lookup program failed")]
    Program {
        /// What was tried.
        what: &'static str,
        /// The error.
        #[source]
        source: Box<ProgramError>,
    },
    /// Pinning failed.
    #[error("pinning {0} failed")]
    Pin(PathBuf, #[source] aya::pin::PinError),
    /// Opening the pinned link failed.
    #[error("opening the pinned link {0} failed")]
    Link(PathBuf, #[source] aya::programs::links::LinkError),
    /// The program's object file could not be parsed.
    #[error("parsing the sk_lookup program's object file failed")]
    Parse(#[source] aya_obj::ParseError),
    /// A pinned map could not be inspected.
    #[error("inspecting the pinned map {0} failed")]
    PinnedMap(PathBuf, #[source] MapError),
    /// A pinned map's type, key or value size, or capacity is not what this build's program
    /// declares: another hotswap version left it. aya would reuse it as it is and the program
    /// would read it wrongly.
    #[error("the pinned map {} does not fit this build's program (it has {found}; this build needs {expected}): it was left by another hotswap version; run that version, or stop the daemon and remove {} to start afresh", path.display(), dir.display())]
    IncompatibleMap {
        /// The pinned map.
        path: PathBuf,
        /// Its state directory.
        dir: PathBuf,
        /// Its layout.
        found: String,
        /// This build's layout.
        expected: String,
    },
    /// A map is missing from the object file or has the wrong type.
    #[error("map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// The error.
        #[source]
        source: MapError,
    },
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> SkLookupError {
    move |source| SkLookupError::Map { map, source }
}

fn program_error(what: &'static str) -> impl FnOnce(ProgramError) -> SkLookupError {
    move |source| SkLookupError::Program {
        what,
        source: Box::new(source),
    }
}

/// The default state directory for the current network namespace:
/// `/sys/fs/bpf/hotswap/<netns inode>`.
pub fn default_pin_dir() -> io::Result<PathBuf> {
    let netns = crate::socket::netns_inode(Path::new(NETNS_PATH))?;
    Ok(PathBuf::from(format!("/sys/fs/bpf/hotswap/{netns}")))
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` can live on bpffs: mounts bpffs at /sys/fs/bpf when it is not mounted
/// and the directory is below it, and refuses directories on any other file system.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), SkLookupError> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        nix::mount::mount(
            Some("bpf"),
            sys_bpf,
            Some("bpf"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            // As systemd mounts it: root's alone, not the kernel's default 1777.
            Some("mode=0700"),
        )
        .map_err(SkLookupError::MountBpffs)?;
    }
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        return Err(SkLookupError::NotBpffs(pin_dir.to_owned()));
    }
    Ok(())
}

/// Refuses pinned maps whose type, key size, value size or capacity differ from what this
/// build's program declares, before anything is loaded or changed. (A change that keeps all
/// four, e.g. reordered fields of one size, cannot be seen here: bump the state directory.)
/// Returns the pin paths of the declared maps that are not pinned yet.
fn check_pinned_maps(pin_dir: &Path) -> Result<Vec<PathBuf>, SkLookupError> {
    let mut unpinned = Vec::new();
    let object = aya_obj::Object::parse(PROGRAM_OBJECT).map_err(SkLookupError::Parse)?;
    let describe = |(kind, key, value, entries): (u32, u32, u32, u32)| {
        format!("type {kind}, {key}-byte keys, {value}-byte values, {entries} entries")
    };
    for (name, declared) in &object.maps {
        let path = pin_dir.join(name);
        if !path.exists() {
            unpinned.push(path);
            continue;
        }
        let pinned = aya::maps::MapInfo::from_pin(&path)
            .map_err(|e| SkLookupError::PinnedMap(path.clone(), e))?;
        let found = (
            pinned.map_type().map_or(u32::MAX, |kind| kind as u32),
            pinned.key_size(),
            pinned.value_size(),
            pinned.max_entries(),
        );
        let expected = (
            declared.map_type(),
            declared.key_size(),
            declared.value_size(),
            declared.max_entries(),
        );
        if found != expected {
            return Err(SkLookupError::IncompatibleMap {
                path,
                dir: pin_dir.to_owned(),
                found: describe(found),
                expected: describe(expected),
            });
        }
    }
    Ok(unpinned)
}

/// The kernel state of one network namespace, owned by the daemon while it runs.
pub struct SkLookupBackend {
    pin_dir: PathBuf,
    bindings: LpmTrie<MapData, BindingData, BindingValue>,
    sockets: SockHash<MapData, SocketKey>,
    probes: SockHash<MapData, ProbeKey>,
    /// Probe sources routed now; the program looks into `probes` only while there are any.
    probe_sources: std::collections::BTreeSet<(Protocol, SocketAddr)>,
    metrics: PerCpuArray<MapData, ServiceMetrics>,
    config: Array<MapData, u32>,
    services: HashMap<MapData, u32, ServiceRecord>,
    generations: HashMap<MapData, GenerationKey, GenerationRecord>,
    owners: HashMap<MapData, u32, OwnerRecord>,
    program_id: u32,
    verified_instructions: Option<u32>,
    adopted: bool,
    reason: String,
    /// Held for the daemon's lifetime: one writer per state directory.
    _lock: Flock<File>,
}

impl SkLookupBackend {
    /// Loads the program and attaches it to the current network namespace, or adopts what an
    /// earlier daemon pinned in `pin_dir`. When the pinned program differs from the one built
    /// into this binary, the new one is attached first and the old one detached after, so
    /// steering never stops.
    pub fn open(pin_dir: &Path, netns: u64) -> Result<Self, SkLookupError> {
        ensure_bpffs(pin_dir)?;
        crate::files::private_dir(pin_dir)?;
        let dir = File::open(pin_dir).map_err(PathError::at("opening", pin_dir))?;
        let lock = crate::files::lock_exclusive(dir, pin_dir).map_err(|err| match err {
            crate::files::LockError::Held { holder, .. } => SkLookupError::Locked {
                path: pin_dir.to_owned(),
                holder,
            },
            crate::files::LockError::Failed(err) => err.into(),
        })?;

        let link_path = pin_dir.join("link");
        let program_path = pin_dir.join("program");
        let mut discarded = false;
        if link_path.exists() {
            let owner = open_pin(&link_path)
                .and_then(|link| link_netns_inode(link.as_fd()))
                .map_err(PathError::at("inspecting", &link_path))?;
            if owner == 0 {
                // The namespace this state served is gone (its inode number was reused by
                // ours): its bindings mean nothing here.
                discard_state(pin_dir)?;
                discarded = true;
            } else if u64::from(owner) != netns {
                return Err(SkLookupError::ForeignNetns {
                    path: pin_dir.to_owned(),
                    owner,
                    ours: netns,
                });
            }
        }

        let unpinned = check_pinned_maps(pin_dir)?;
        let mut ebpf = load_program(pin_dir).inspect_err(|_| {
            // The loader pins maps before the verifier sees the program: a refused program
            // must not leave fresh, empty maps in the state directory.
            for path in &unpinned {
                let _ = std::fs::remove_file(path);
            }
        })?;
        let program = sk_lookup_program(&mut ebpf)?;
        let new_info = program.info().map_err(program_error("inspecting"))?;

        let pinned = if link_path.exists() {
            let link = PinnedLink::from_pin(&link_path)
                .map_err(|e| SkLookupError::Link(link_path.clone(), e))?;
            let link = FdLink::from(link);
            let attached_id = link
                .info()
                .map_err(|e| SkLookupError::Link(link_path.clone(), e))?
                .program_id();
            let attached = ProgramInfo::from_pin(&program_path)
                .ok()
                .filter(|info| info.id() == attached_id);
            Some((link, attached))
        } else {
            None
        };

        let (program_id, verified_instructions, adopted, reason) = match pinned {
            Some((_link, Some(attached))) if attached.tag() == new_info.tag() => {
                // The same program is attached already: adopt it; the freshly loaded copy is
                // dropped with `ebpf` without ever being attached.
                (
                    attached.id(),
                    attached.verified_instruction_count(),
                    true,
                    "sk_lookup program adopted from the pinned state".to_owned(),
                )
            }
            pinned => {
                let upgrading = pinned.is_some();
                let netns = File::open(NETNS_PATH)
                    .map_err(PathError::at("opening", Path::new(NETNS_PATH)))?;
                let link_id = program
                    .attach(netns.as_fd())
                    .map_err(program_error("attaching"))?;
                let link: FdLink = program
                    .take_link(link_id)
                    .map_err(program_error("attaching"))?
                    .into();
                // Pin under temporary names (bpffs refuses dots in names), then rename over the old pins: the old link
                // file's last reference goes when `pinned` drops, detaching the old program
                // only after the new one runs.
                let new_link_path = pin_dir.join("link_new");
                let new_program_path = pin_dir.join("program_new");
                let _ = std::fs::remove_file(&new_link_path);
                let _ = std::fs::remove_file(&new_program_path);
                program
                    .pin(&new_program_path)
                    .map_err(|e| SkLookupError::Pin(new_program_path.clone(), e))?;
                link.pin(&new_link_path)
                    .map_err(|e| SkLookupError::Pin(new_link_path.clone(), e))?;
                std::fs::rename(&new_program_path, &program_path)
                    .map_err(PathError::at("renaming", &new_program_path))?;
                std::fs::rename(&new_link_path, &link_path)
                    .map_err(PathError::at("renaming", &new_link_path))?;
                drop(pinned);
                let reason = if upgrading {
                    "sk_lookup program upgraded: the pinned one differed from this build's"
                } else if discarded {
                    "sk_lookup program loaded and attached; pinned state of a network namespace that no longer exists was discarded"
                } else {
                    "sk_lookup program loaded and attached"
                };
                (
                    new_info.id(),
                    new_info.verified_instruction_count(),
                    upgrading,
                    reason.to_owned(),
                )
            }
        };

        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(SkLookupError::Map {
                map: name,
                source: MapError::InvalidName {
                    name: name.to_owned(),
                },
            })
        };
        let bindings = take(map_names::BINDINGS)?
            .try_into()
            .map_err(map_error(map_names::BINDINGS))?;
        let sockets = take(map_names::SOCKETS)?
            .try_into()
            .map_err(map_error(map_names::SOCKETS))?;
        let metrics = take(map_names::METRICS)?
            .try_into()
            .map_err(map_error(map_names::METRICS))?;
        let config = take(map_names::CONFIG)?
            .try_into()
            .map_err(map_error(map_names::CONFIG))?;
        let services = take(map_names::SERVICES)?
            .try_into()
            .map_err(map_error(map_names::SERVICES))?;
        let generations = take(map_names::GENERATIONS)?
            .try_into()
            .map_err(map_error(map_names::GENERATIONS))?;
        let owners = take(map_names::OWNERS)?
            .try_into()
            .map_err(map_error(map_names::OWNERS))?;
        let mut probes: SockHash<MapData, ProbeKey> = take(map_names::PROBES)?
            .try_into()
            .map_err(map_error(map_names::PROBES))?;
        let mut config: Array<MapData, u32> = config;
        // Probes belong to the control connections of the daemon that made them, and those are
        // gone: route nothing any more.
        let stale: Vec<ProbeKey> = probes.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = probes.remove(&key);
        }
        config
            .set(CONFIG_PROBES, 0, 0)
            .map_err(map_error(map_names::CONFIG))?;
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            bindings,
            sockets,
            probes,
            probe_sources: std::collections::BTreeSet::new(),
            metrics,
            config,
            services,
            generations,
            owners,
            program_id,
            verified_instructions,
            adopted,
            reason,
            _lock: lock,
        })
    }

    /// The id of the attached program (for aya-log and `bpftool`).
    pub fn program_id(&self) -> u32 {
        self.program_id
    }
}

/// Creates the object's maps (pinned by name in `pin_dir`: the loader reuses pinned ones, so
/// their contents survive) and loads the program into the kernel, unattached. The daemon and
/// `hotswap doctor` both load through here, so they see and report the same errors.
pub fn load_program(pin_dir: &Path) -> Result<Ebpf, SkLookupError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(PROGRAM_OBJECT)
        .map_err(|e| {
            if has_errno(&e, libc::EPERM) {
                SkLookupError::PermissionDenied(Box::new(e))
            } else {
                SkLookupError::Load(Box::new(e))
            }
        })?;
    sk_lookup_program(&mut ebpf)?
        .load()
        .map_err(|e| load_error(e, perfmon_capable()))?;
    Ok(ebpf)
}

fn sk_lookup_program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, SkLookupError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| program_error("finding")(ProgramError::NotLoaded))?
        .try_into()
        .map_err(program_error("finding"))
}

/// Classifies a failed `BPF_PROG_LOAD`. aya retries a failed load with the verifier's log on,
/// so a log means the verifier ran and refused; a refusal before it (missing capability,
/// unknown program type) leaves the log empty.
fn load_error(err: ProgramError, perfmon_capable: bool) -> SkLookupError {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if log.trim().is_empty() {
                program_error("loading")(ProgramError::LoadError {
                    io_error,
                    verifier_log,
                })
            } else {
                SkLookupError::VerifierRejected(VerifierRejection {
                    errno: nix::errno::Errno::from_raw(io_error.raw_os_error().unwrap_or(0)),
                    log,
                    perfmon_capable,
                })
            }
        }
        other => program_error("loading")(other),
    }
}

/// This thread's effective capability set (`CapEff`), 0 when it cannot be read.
pub(crate) fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// `CAP_PERFMON`'s bit.
pub(crate) const CAP_PERFMON: u32 = 38;
/// `CAP_SYS_ADMIN`'s bit.
pub(crate) const CAP_SYS_ADMIN: u32 = 21;

/// The kernel's `perfmon_capable()`: without it the verifier applies its unprivileged rules
/// (no pointer leaks, Spectre v1/v4 sanitation, pointer arithmetic only on known paths), and
/// this program does not pass them.
fn perfmon_capable() -> bool {
    let effective = effective_capabilities();
    effective & (1 << CAP_PERFMON | 1 << CAP_SYS_ADMIN) != 0
}

/// The kernel's verifier refused the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierRejection {
    /// `BPF_PROG_LOAD`'s errno (EACCES for most refusals).
    pub errno: nix::errno::Errno,
    /// The verifier's whole log.
    pub log: String,
    /// Whether the loading thread held CAP_PERFMON or CAP_SYS_ADMIN (the verifier's
    /// privileged rules).
    pub perfmon_capable: bool,
}

impl std::fmt::Display for VerifierRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // One line: errors are printed on one line, the whole log goes elsewhere.
        write!(
            f,
            "the kernel's verifier rejected the sk_lookup program ({:?}): {}",
            self.errno,
            verifier_log_excerpt(&self.log).join(" | ")
        )?;
        if self.perfmon_capable {
            write!(
                f,
                "; report it with the log from `hotswap doctor --verifier-log`"
            )
        } else {
            write!(f, "; this process holds neither CAP_PERFMON nor CAP_SYS_ADMIN, so the verifier applied its unprivileged rules, which this program does not pass: grant CAP_PERFMON")
        }
    }
}

/// The lines of a verifier log that say why it refused: the last few instructions (without
/// their register states) and source lines before the error, the error line(s), and the
/// `processed N insns` summary.
pub fn verifier_log_excerpt(log: &str) -> Vec<String> {
    /// Instructions shown before the error, the failing one included.
    const CONTEXT: usize = 3;
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    let is_insn = |l: &str| {
        l.split_once(": (")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let is_summary = |l: &str| {
        l.starts_with("processed ")
            || l.starts_with("verification time ")
            || l.starts_with("stack depth ")
    };
    let body: Vec<&str> = lines.iter().copied().filter(|l| !is_summary(l)).collect();
    let mut excerpt: Vec<String> = match body.iter().rposition(|l| is_insn(l)) {
        Some(last) => {
            let first = body[..=last]
                .iter()
                .enumerate()
                .filter(|(_, l)| is_insn(l))
                .map(|(i, _)| i)
                .rev()
                .nth(CONTEXT - 1)
                .unwrap_or(0);
            body[first..=last]
                .iter()
                .filter(|l| is_insn(l) || l.starts_with(';'))
                .map(|l| without_state(l).to_owned())
                .chain(body[last + 1..].iter().map(|l| (*l).to_owned()))
                .collect()
        }
        // No instruction listing (a refusal before the walk): the last lines are the error.
        None => body[body.len().saturating_sub(CONTEXT)..]
            .iter()
            .map(|l| (*l).to_owned())
            .collect(),
    };
    excerpt.extend(
        lines
            .iter()
            .filter(|l| l.starts_with("processed "))
            .map(|l| (*l).to_owned()),
    );
    excerpt
}

/// An instruction line without the register states the verifier appends: after ` ; `, or
/// after a branch the target's state (`goto pc+1 143: R0=…`).
fn without_state(line: &str) -> &str {
    let mut end = line.find(" ; ").unwrap_or(line.len());
    if let Some(pos) = line[..end].match_indices(": R").map(|(i, _)| i).find(|&i| {
        let head = &line[..i];
        let digits = head.len() - head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        digits > 0 && head[..head.len() - digits].ends_with(' ')
    }) {
        let head = &line[..pos];
        end = head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    }
    line[..end].trim_end()
}

/// Why sk_lookup cannot work on this host at all (as opposed to a problem with a daemon's
/// own state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// The kernel refused before the verifier ran (EPERM/EACCES, no log): capabilities are
    /// missing, or held only in a user namespace.
    PermissionDenied(nix::errno::Errno),
    /// bpffs is not mounted at /sys/fs/bpf and mounting it was refused.
    NoBpffs(nix::errno::Errno),
    /// The kernel does not know sk_lookup programs or something they need.
    UnsupportedKernel(nix::errno::Errno),
    /// The verifier refused the program.
    VerifierRejected(VerifierRejection),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PermissionDenied(errno) => write!(
                f,
                "permission denied ({errno:?}): loading the sk_lookup program needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON in the host's user namespace (root has them; without CAP_PERFMON the kernel's verifier rejects this program)"
            ),
            Self::NoBpffs(errno) => write!(
                f,
                "bpffs is not mounted at /sys/fs/bpf and mounting it was refused ({errno:?}): that needs CAP_SYS_ADMIN in the host's user namespace"
            ),
            Self::UnsupportedKernel(errno) => write!(
                f,
                "the kernel does not support sk_lookup programs ({errno:?}): they need Linux 5.9 or later"
            ),
            Self::VerifierRejected(rejection) => rejection.fmt(f),
        }
    }
}

impl SkLookupError {
    /// The verifier's whole log, when the verifier refused the program.
    pub fn verifier_log(&self) -> Option<&str> {
        match self {
            Self::VerifierRejected(rejection) => Some(&rejection.log),
            _ => None,
        }
    }

    /// Why sk_lookup cannot work on this host at all, if that is what this error means — as
    /// opposed to a problem with this daemon's state. Decided from the errno and whether the
    /// verifier ran, never from message text or map names (aya reports EPERM as the create
    /// error of whichever map came first).
    pub fn unavailable_reason(&self) -> Option<Unavailable> {
        let errno = |e: &(dyn std::error::Error + 'static)| {
            let mut current = Some(e);
            while let Some(e) = current {
                if let Some(code) = e
                    .downcast_ref::<io::Error>()
                    .and_then(io::Error::raw_os_error)
                {
                    return Some(code);
                }
                if let Some(nix) = e.downcast_ref::<nix::Error>() {
                    return Some(*nix as i32);
                }
                current = e.source();
            }
            None
        };
        let code = match self {
            Self::VerifierRejected(rejection) => {
                return Some(Unavailable::VerifierRejected(rejection.clone()))
            }
            Self::PermissionDenied(_) => libc::EPERM,
            Self::MountBpffs(e @ (nix::errno::Errno::EPERM | nix::errno::Errno::EACCES)) => {
                return Some(Unavailable::NoBpffs(*e))
            }
            Self::MountBpffs(e) => *e as i32,
            Self::Load(e) => errno(e.as_ref())?,
            Self::Program { source, .. } => errno(source.as_ref())?,
            // Reading a pinned map needs the same privileges as loading (EACCES there would
            // be the pin file's own permissions: a problem with the state, not the host).
            Self::PinnedMap(_, source) => match errno(source)? {
                libc::EPERM => libc::EPERM,
                _ => return None,
            },
            Self::Io(e) => e.source.raw_os_error()?,
            _ => return None,
        };
        let errno = nix::errno::Errno::from_raw(code);
        match code {
            libc::EPERM | libc::EACCES => Some(Unavailable::PermissionDenied(errno)),
            // 524 is the kernel-internal ENOTSUPP some BPF paths leak; ENODEV: no bpffs.
            libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::E2BIG | libc::ENODEV | 524 => {
                Some(Unavailable::UnsupportedKernel(errno))
            }
            _ => None,
        }
    }
}

/// Whether `err` or one of its causes is the OS error `errno`.
fn has_errno(err: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(errno) {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// Removes every pin in the state directory (maps, program, link).
fn discard_state(pin_dir: &Path) -> Result<(), SkLookupError> {
    let entries = std::fs::read_dir(pin_dir).map_err(PathError::at("reading", pin_dir))?;
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(PathError::at("removing", &path))?;
    }
    Ok(())
}

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    /// The `obj` member of `union bpf_attr` for `BPF_OBJ_GET`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr points at a NUL-terminated path that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs the program once on a made-up lookup from and to the unspecified address and port 0
/// (`BPF_PROG_TEST_RUN`, Linux 5.9 on): the cookie of the socket it selects, if it selects
/// one. aya 0.14 has no test runs, so this asks the kernel directly.
fn test_run_lookup(
    program: BorrowedFd<'_>,
    family: libc::c_int,
    protocol: Protocol,
) -> io::Result<Option<u64>> {
    /// `struct bpf_sk_lookup` as a test run's context (`cookie` in its first union).
    #[repr(C)]
    #[derive(Default)]
    struct LookupContext {
        cookie: u64,
        family: u32,
        protocol: u32,
        remote_ip4: u32,
        remote_ip6: [u32; 4],
        remote_port: u32,
        local_ip4: u32,
        local_ip6: [u32; 4],
        local_port: u32,
        ingress_ifindex: u32,
    }
    /// The `test` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const SK_PASS: u32 = 1;
    let input = LookupContext {
        family: family as u32,
        protocol: u32::from(protocol.number()),
        // From and to the unspecified address and port 0: the check path's marks.
        ..Default::default()
    };
    let mut output = LookupContext::default();
    let mut attr = TestRun {
        prog_fd: program.as_raw_fd() as u32,
        repeat: 1,
        ctx_size_in: std::mem::size_of::<LookupContext>() as u32,
        ctx_size_out: std::mem::size_of::<LookupContext>() as u32,
        ctx_in: &raw const input as u64,
        ctx_out: &raw mut output as u64,
        ..Default::default()
    };
    // SAFETY: attr describes two live, correctly sized contexts for the call's duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            std::mem::size_of::<TestRun>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((attr.retval == SK_PASS && output.cookie != 0).then_some(output.cookie))
}

/// The inode of the network namespace a netns link is attached to; 0 once that namespace is
/// gone. aya 0.14's `LinkInfo` does not expose it, so this asks the kernel directly.
fn link_netns_inode(link: BorrowedFd<'_>) -> io::Result<u32> {
    /// `struct bpf_link_info` up to its netns member; the union starts 8-aligned at 16.
    #[repr(C)]
    #[derive(Default)]
    struct NetnsLinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        pad: u32,
        netns_ino: u32,
        attach_type: u32,
    }
    /// The `info` member of `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let mut info = NetnsLinkInfo::default();
    let attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<NetnsLinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: attr points at a valid buffer of info_len bytes for the kernel to fill.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.netns_ino)
}

fn not_found(err: &MapError) -> bool {
    matches!(err, MapError::KeyNotFound | MapError::ElementNotFound)
        || matches!(err, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOENT))
}

impl Backend for SkLookupBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "sk_lookup".to_owned(),
            reason: self.reason.clone(),
            state_dir: self.pin_dir.display().to_string(),
            program_id: Some(self.program_id),
            verified_instructions: self.verified_instructions,
            adopted: self.adopted,
            capabilities: self.capabilities(),
            unserved: Vec::new(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sockets: SocketSource::Own,
            socket_per_generation: true,
            switch: Support::Yes,
            probe: Support::Yes,
            metrics: Support::Yes,
            prefixes: Support::Yes,
            debug_log: Support::Yes,
        }
    }

    fn load_state(&self) -> Result<PersistedState, BackendError> {
        let mut state = PersistedState::default();
        for entry in self.services.iter() {
            state
                .services
                .push(entry.map_err(map_error(map_names::SERVICES))?);
        }
        for entry in self.bindings.iter() {
            let (key, value) = entry.map_err(map_error(map_names::BINDINGS))?;
            if let Some(binding) = Binding::from_trie_key(key.prefix_len(), &key.data()) {
                state.bindings.push((binding, value.service_id));
            }
        }
        for entry in self.generations.iter() {
            state
                .generations
                .push(entry.map_err(map_error(map_names::GENERATIONS))?);
        }
        for entry in self.owners.iter() {
            state
                .owners
                .push(entry.map_err(map_error(map_names::OWNERS))?);
        }
        Ok(state)
    }

    fn add_binding(&mut self, binding: &Binding, service_id: u32) -> Result<(), BackendError> {
        let (len, data) = binding.trie_key();
        let value = BindingValue {
            service_id,
            addr_prefix_len: binding.addr_prefix_len(),
        };
        self.bindings
            // BPF_NOEXIST: never silently take an address from another service.
            .insert(&Key::new(len, data), value, BPF_NOEXIST)
            .map_err(map_error(map_names::BINDINGS))?;
        Ok(())
    }

    fn remove_binding(&mut self, binding: &Binding) -> Result<(), BackendError> {
        let (len, data) = binding.trie_key();
        match self.bindings.remove(&Key::new(len, data)) {
            Err(err) if !not_found(&err) => Err(map_error(map_names::BINDINGS)(err).into()),
            _ => Ok(()),
        }
    }

    fn activate(
        &mut self,
        service_id: u32,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        // BPF_ANY: one map update replaces the previous socket atomically.
        self.sockets
            .insert(SocketKey::new(service_id, protocol.number()), socket, 0)
            .map_err(map_error(map_names::SOCKETS))?;
        Ok(())
    }

    fn deactivate(&mut self, service_id: u32, protocol: Protocol) -> Result<(), BackendError> {
        match self
            .sockets
            .remove(&SocketKey::new(service_id, protocol.number()))
        {
            Err(err) if !not_found(&err) => Err(map_error(map_names::SOCKETS)(err).into()),
            _ => Ok(()),
        }
    }

    fn metrics(&self, service_id: u32) -> Result<ServiceMetrics, BackendError> {
        let per_cpu = self
            .metrics
            .get(&service_id, 0)
            .map_err(map_error(map_names::METRICS))?;
        Ok(per_cpu
            .iter()
            .fold(ServiceMetrics::default(), |sum, m| ServiceMetrics {
                lookups: sum.lookups + m.lookups,
                steered: sum.steered + m.steered,
                no_socket: sum.no_socket + m.no_socket,
                errors: sum.errors + m.errors,
            }))
    }

    fn save_service(
        &mut self,
        service_id: u32,
        record: &ServiceRecord,
        is_new: bool,
    ) -> Result<(), BackendError> {
        if is_new {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
                map_error(map_names::METRICS)(MapError::SyscallError(aya::sys::SyscallError {
                    call: "nr_cpus",
                    io_error: e,
                }))
            })?;
            let zeroes =
                PerCpuValues::try_from(vec![ServiceMetrics::default(); cpus]).map_err(|e| {
                    map_error(map_names::METRICS)(MapError::SyscallError(aya::sys::SyscallError {
                        call: "zero metrics",
                        io_error: e,
                    }))
                })?;
            self.metrics
                .set(service_id, zeroes, 0)
                .map_err(map_error(map_names::METRICS))?;
        }
        self.services
            .insert(service_id, record, 0)
            .map_err(map_error(map_names::SERVICES))?;
        Ok(())
    }

    fn forget_service(&mut self, service_id: u32) -> Result<(), BackendError> {
        // The owner first: a service forgotten halfway keeps its name, never an owner it
        // no longer has.
        self.save_owner(service_id, &OwnerRecord::default())?;
        match self.services.remove(&service_id) {
            Err(err) if !not_found(&err) => Err(map_error(map_names::SERVICES)(err).into()),
            _ => Ok(()),
        }
    }

    fn save_owner(&mut self, service_id: u32, owner: &OwnerRecord) -> Result<(), BackendError> {
        let result = if owner.has == 0 {
            match self.owners.remove(&service_id) {
                Err(err) if not_found(&err) => Ok(()),
                result => result,
            }
        } else {
            self.owners.insert(service_id, owner, 0)
        };
        result.map_err(|e| map_error(map_names::OWNERS)(e).into())
    }

    fn save_generation(
        &mut self,
        key: &GenerationKey,
        record: &GenerationRecord,
    ) -> Result<(), BackendError> {
        self.generations
            .insert(key, record, 0)
            .map_err(map_error(map_names::GENERATIONS))?;
        Ok(())
    }

    fn forget_generation(&mut self, key: &GenerationKey) -> Result<(), BackendError> {
        match self.generations.remove(key) {
            Err(err) if !not_found(&err) => Err(map_error(map_names::GENERATIONS)(err).into()),
            _ => Ok(()),
        }
    }

    fn listener(
        &mut self,
        _: u32,
        _: Protocol,
        _: Option<crate::socket::Pidfd>,
    ) -> Result<Option<OwnedFd>, BackendError> {
        // Each generation brings its own socket; the program steers to it.
        Ok(None)
    }

    fn admit(
        &mut self,
        _: u32,
        _: Protocol,
        _: BorrowedFd<'_>,
        _: u64,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn steered(&mut self, service_id: u32, protocol: Protocol) -> Result<Steered, BackendError> {
        let read_back = |source| SkLookupError::ReadBack { service_id, source };
        let program = open_pin(&self.pin_dir.join("program")).map_err(read_back)?;
        // Only lookups from and to the unspecified address, port 0, go to `service_id` while
        // this is set, and none but the test runs below has such addresses (the kernel does not
        // deliver a packet to the unspecified address locally); it is cleared whatever they
        // found.
        self.config
            .set(CONFIG_CHECK, service_id, 0)
            .map_err(map_error(map_names::CONFIG))?;
        // A socket of either family may serve the service: ask as IPv4, then as IPv6 (an
        // IPv6-only socket cannot take an IPv4 lookup, nor an IPv4 socket an IPv6 one).
        let found = [libc::AF_INET, libc::AF_INET6]
            .into_iter()
            .map(|family| test_run_lookup(program.as_fd(), family, protocol))
            .find(|result| !matches!(result, Ok(None)))
            .unwrap_or(Ok(None));
        self.config
            .set(CONFIG_CHECK, 0, 0)
            .map_err(map_error(map_names::CONFIG))?;
        Ok(match found.map_err(read_back)? {
            Some(cookie) => Steered::Socket(cookie),
            None => Steered::Nothing,
        })
    }

    fn set_debug_log(&mut self, on: bool) -> Result<(), BackendError> {
        self.config
            .set(CONFIG_DEBUG_LOG, u32::from(on), 0)
            .map_err(map_error(map_names::CONFIG))?;
        Ok(())
    }

    fn add_probe(
        &mut self,
        source: SocketAddr,
        protocol: Protocol,
        socket: BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        let source = crate::model::canonical(source);
        let new = !self.probe_sources.contains(&(protocol, source));
        // The count first: the program must look before the first probe connection comes.
        if new {
            self.set_probe_count(self.probe_sources.len() + 1)?;
        }
        if let Err(err) = self.probes.insert(probe_key(source, protocol), socket, 0) {
            if new {
                self.set_probe_count(self.probe_sources.len())?;
            }
            return Err(map_error(map_names::PROBES)(err).into());
        }
        self.probe_sources.insert((protocol, source));
        Ok(())
    }

    fn remove_probe(&mut self, source: SocketAddr, protocol: Protocol) -> Result<(), BackendError> {
        let source = crate::model::canonical(source);
        match self.probes.remove(&probe_key(source, protocol)) {
            // Gone already when the probed socket closed.
            Err(err) if !not_found(&err) => return Err(map_error(map_names::PROBES)(err).into()),
            _ => {}
        }
        if self.probe_sources.remove(&(protocol, source)) {
            self.set_probe_count(self.probe_sources.len())?;
        }
        Ok(())
    }
}

impl SkLookupBackend {
    fn set_probe_count(&mut self, count: usize) -> Result<(), BackendError> {
        self.config
            .set(CONFIG_PROBES, count as u32, 0)
            .map_err(map_error(map_names::CONFIG))?;
        Ok(())
    }
}

/// The probes map's key for connections from `source`.
fn probe_key(source: SocketAddr, protocol: Protocol) -> ProbeKey {
    let (family, addr) = crate::model::map_address(source.ip());
    ProbeKey {
        protocol: protocol.number(),
        family,
        port: source.port().to_be_bytes(),
        addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    /// The tail of Debian 12's 6.1 verifier log for an earlier build of the program.
    const LOG_6_1: &str = r"65: (61) r1 = *(u32 *)(r0 +0)         ; R0_w=map_value(off=0,ks=24,vs=8,imm=0) R1_w=scalar(umax=4294967295,var_off=(0x0; 0xffffffff))
; match (exact, wildcard) {
66: (7b) *(u64 *)(r10 -48) = r1       ; R1_w=scalar(umax=4294967295,var_off=(0x0; 0xffffffff)) R10=fp0 fp-48_w=
67: (79) r2 = *(u64 *)(r10 -80)
invalid read from stack R10 off=-80 size=8
verification time 81860 usec
stack depth 88
processed 6407 insns (limit 1000000) max_states_per_insn 4 total_states 409 peak_states 307 mark_read 35
";

    /// The tail of 6.18's log for this program without CAP_PERFMON and CAP_SYS_ADMIN; 141's
    /// line carries the branch target's state after the instruction.
    const LOG_6_18: &str = r"137: (1d) if r2 == r4 goto pc+1       ; R2=scalar(smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) R4=0xfffffffe
138: (b7) r3 = 24                     ; R3=24
139: (18) r4 = 0xffffffa2             ; R4=0xffffffa2
141: (1d) if r2 == r4 goto pc+1 143: R0=scalar() R1=16 R2=0xffffffa2 R3=24 R4=0xffffffa2 R5=scalar(id=12,umin=1) R6=0 R7=scalar(id=5,smin=umin=umin32=1,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) R8=scalar(id=12) R9=map_value(map=HS_METRICS,ks=4,vs=32) R10=fp0 fp-16=mmmm0xffff0000 fp-24=00000 fp-32=scalar(id=9,smin=umin=umin32=1,smax=umax=0xffffffffff,var_off=(0x0; 0xffffffffff)) fp-40=scalar(id=1,smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) fp-48=scalar(id=5,smin=umin=umin32=1,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) fp-56=scalar(id=2,smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) fp-64=scalar(id=3,smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff)) fp-72=4 fp-80=scalar(id=6,smin=0,smax=umax=0xffffffff,var_off=(0x0; 0xffffffff))
; if err == -ENOENT || err == -ESOCKTNOSUPPORT { @ main.rs:134
143: (0f) r9 += r1
R9 tried to add from different maps, paths or scalars, pointer arithmetic with it prohibited for !root
verification time 348 usec
stack depth 80
processed 143 insns (limit 1000000) max_states_per_insn 0 total_states 10 peak_states 10 mark_read 0
";

    #[test]
    fn the_excerpt_is_the_last_instructions_the_error_and_the_summary() {
        assert_eq!(
            verifier_log_excerpt(LOG_6_1),
            [
                "65: (61) r1 = *(u32 *)(r0 +0)",
                "; match (exact, wildcard) {",
                "66: (7b) *(u64 *)(r10 -48) = r1",
                "67: (79) r2 = *(u64 *)(r10 -80)",
                "invalid read from stack R10 off=-80 size=8",
                "processed 6407 insns (limit 1000000) max_states_per_insn 4 total_states 409 peak_states 307 mark_read 35",
            ]
        );
    }

    #[test]
    fn the_excerpt_drops_register_states_also_after_a_branch() {
        assert_eq!(
            verifier_log_excerpt(LOG_6_18),
            [
                "139: (18) r4 = 0xffffffa2",
                "141: (1d) if r2 == r4 goto pc+1",
                "; if err == -ENOENT || err == -ESOCKTNOSUPPORT { @ main.rs:134",
                "143: (0f) r9 += r1",
                "R9 tried to add from different maps, paths or scalars, pointer arithmetic with it prohibited for !root",
                "processed 143 insns (limit 1000000) max_states_per_insn 0 total_states 10 peak_states 10 mark_read 0",
            ]
        );
    }

    #[test]
    fn an_excerpt_of_a_log_without_instructions_keeps_its_last_lines() {
        let log = "func#0 @0\nunknown opcode 8d\nprocessed 0 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n";
        assert_eq!(
            verifier_log_excerpt(log),
            [
                "func#0 @0",
                "unknown opcode 8d",
                "processed 0 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0",
            ]
        );
    }

    fn refused(errno: i32, log: &str, perfmon_capable: bool) -> SkLookupError {
        load_error(
            ProgramError::LoadError {
                io_error: io::Error::from_raw_os_error(errno),
                verifier_log: aya_obj::VerifierLog::new(log.to_owned()),
            },
            perfmon_capable,
        )
    }

    #[test]
    fn a_load_error_with_a_log_is_a_verifier_refusal_and_says_so() {
        let err = refused(libc::EACCES, LOG_6_1, true);
        assert_eq!(err.verifier_log(), Some(LOG_6_1));
        let message = crate::error_chain(&err);
        assert!(
            message.starts_with(
                "the kernel's verifier rejected the sk_lookup program (EACCES): 65: (61)"
            ),
            "{message}"
        );
        assert!(message.contains("invalid read from stack R10 off=-80 size=8"));
        assert!(message.contains("processed 6407 insns"));
        assert!(message.contains("hotswap doctor --verifier-log"));
        assert!(!message.contains('\n'), "{message}");
        // Not the capability story: this process had every capability.
        assert!(!message.contains("permission denied"), "{message}");
        match err.unavailable_reason() {
            Some(Unavailable::VerifierRejected(rejection)) => {
                assert_eq!(rejection.errno, Errno::EACCES);
                assert_eq!(rejection.log, LOG_6_1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refusal_under_the_unprivileged_rules_names_cap_perfmon() {
        let reason = refused(libc::EACCES, LOG_6_18, false)
            .unavailable_reason()
            .unwrap()
            .to_string();
        assert!(reason.contains("verifier rejected"), "{reason}");
        assert!(reason.contains("prohibited for !root"), "{reason}");
        assert!(reason.contains("grant CAP_PERFMON"), "{reason}");
    }

    #[test]
    fn a_load_error_without_a_log_is_classified_by_its_errno() {
        for (errno, expected) in [
            (libc::EPERM, Unavailable::PermissionDenied(Errno::EPERM)),
            (libc::EACCES, Unavailable::PermissionDenied(Errno::EACCES)),
            (libc::EINVAL, Unavailable::UnsupportedKernel(Errno::EINVAL)),
        ] {
            let err = refused(errno, "", true);
            assert!(err.verifier_log().is_none());
            assert_eq!(err.unavailable_reason(), Some(expected));
        }
        let reason = refused(libc::EPERM, "", true)
            .unavailable_reason()
            .unwrap()
            .to_string();
        assert!(
            reason.starts_with("permission denied (EPERM)")
                && reason.contains("CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"),
            "{reason}"
        );
        // A problem of the daemon's own, not of the host: no fallback.
        assert_eq!(refused(libc::EBADF, "", true).unavailable_reason(), None);
    }

    #[test]
    fn a_refused_bpffs_mount_is_its_own_reason() {
        let reason = SkLookupError::MountBpffs(Errno::EPERM).unavailable_reason();
        assert_eq!(reason, Some(Unavailable::NoBpffs(Errno::EPERM)));
        assert!(reason.unwrap().to_string().contains("CAP_SYS_ADMIN"));
    }

    /// The committed object `HOTSWAP_EBPF=prebuilt` embeds (see build.rs).
    static PREBUILT_OBJECT: &[u8] =
        aya::include_bytes_aligned!("../../ebpf-prebuilt/hotswap.bpf.o");

    /// CI's check of the prebuilt object against the source: the stamp beside it is the digest
    /// of the eBPF sources this build compiled.
    #[test]
    fn the_prebuilt_ebpf_object_is_built_from_these_sources() {
        let stamp = include_str!("../../ebpf-prebuilt/hotswap.bpf.o.sources-sha256");
        assert_eq!(
            stamp.trim(),
            env!("HOTSWAP_EBPF_SOURCE_DIGEST"),
            "hotswap-ebpf or hotswap-common changed since hotswap/ebpf-prebuilt/ was renewed: \
             run `cargo xtask ebpf-object` and commit what it writes"
        );
    }

    /// And it declares what the object built from source declares: the same programs in the
    /// same sections, the same maps of the same shapes. (Its instructions may differ: another
    /// nightly's code generation.)
    #[test]
    fn the_prebuilt_ebpf_object_declares_what_the_source_does() {
        let shape = |bytes: &[u8]| {
            let object = aya_obj::Object::parse(bytes).expect("an eBPF object");
            let programs: std::collections::BTreeMap<String, String> = object
                .programs
                .iter()
                .map(|(name, program)| (name.clone(), format!("{:?}", program.section)))
                .collect();
            // Only declared maps: the data sections (.rodata, .data, .bss) are maps to aya too,
            // sized by code generation.
            let maps: std::collections::BTreeMap<String, (u32, u32, u32, u32)> = object
                .maps
                .iter()
                .filter(|(name, _)| !name.starts_with('.'))
                .map(|(name, map)| {
                    let shape = (
                        map.map_type(),
                        map.key_size(),
                        map.value_size(),
                        map.max_entries(),
                    );
                    (name.clone(), shape)
                })
                .collect();
            (programs, maps)
        };
        if option_env!("HOTSWAP_EBPF_EMBEDDED") == Some("prebuilt") {
            // This build embeds the prebuilt object itself: there is no built one to compare
            // with (the digest test above still holds it to the sources).
            eprintln!("HOTSWAP_EBPF=prebuilt: no object built from source to compare with");
            return;
        }
        let built = shape(PROGRAM_OBJECT);
        assert!(built.0.contains_key(PROGRAM_NAME), "{built:?}");
        assert_eq!(shape(PREBUILT_OBJECT), built);
    }
}
