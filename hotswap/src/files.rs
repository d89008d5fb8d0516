//! Where hotswap keeps things on disk, written once with the strictest rules and used
//! everywhere:
//!
//! - [`private_dir`]: every directory hotswap keeps state, locks or sockets in is its user's
//!   alone (0700), and no directory on the way there can be changed by anyone else — a local
//!   user who could create, open or replace one could lock hotswap out or move its state.
//! - [`lock_exclusive`] on [`open_lock_file`]: one writer per state, and "held by another
//!   process" (with that process's pid) told apart from a lock that failed.
//! - [`bind_private_socket`]: control sockets only their owner may connect to.
//! - `replace_private`: files only their owner may read, replaced whole: the one way hotswap
//!   writes state (the uds/reuseport backends' state files, a supervisor's record of its
//!   generations).
//!
//! Replacing a file can block for a long time on a busy disk: the replaced inode waits for its
//! pages' writeback (measured: `rename` in `folio_wait_writeback` from `ext4_evict_inode`, for
//! seconds, while the lifecycle tests ran on ext4). Writers that must not stall (a supervisor)
//! call this off their runtime's thread.

use std::{
    fs::File,
    io,
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// A directory hotswap would keep things in is not safe to use.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// A component of the path is a symbolic link: whoever may change the link decides where
    /// hotswap's state goes.
    #[error("{} is a symbolic link; hotswap keeps its state only under real directories (use the path it points to)", path.display())]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A component of the path is not a directory.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The component.
        path: PathBuf,
    },
    /// A component of the path belongs to another user, who could replace what hotswap keeps
    /// there (or made it first, to move hotswap's state).
    #[error("{} belongs to uid {owner}, not to root or hotswap's uid {ours}; refusing to use it (remove it, and hotswap makes its own)", path.display())]
    ForeignOwner {
        /// The component.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// hotswap's effective uid.
        ours: u32,
    },
    /// A directory on the way is writable by others without the sticky bit: anyone could
    /// rename hotswap's directory away.
    #[error("{} is writable by other users (mode {mode:04o}) without the sticky bit; refusing to keep state below it", path.display())]
    OpenToOthers {
        /// The component.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Reading, making or restricting a directory failed.
    #[error(transparent)]
    Io(#[from] crate::PathError),
}

/// Makes `path` a directory only hotswap's user may use (0700, owned by the effective uid),
/// creating what is missing, and checks every directory on the way, component by component:
/// no symbolic links, each owned by root or hotswap's user, none writable by others unless
/// sticky. A directory of hotswap's own user that is open wider (made by an older hotswap, or by
/// hand) is narrowed to 0700.
pub fn private_dir(path: &Path) -> Result<(), PrivateDirError> {
    let ours = nix::unistd::geteuid().as_raw();
    let absolute = std::path::absolute(path).map_err(crate::PathError::at("resolving", path))?;
    let mut current = PathBuf::new();
    let last = absolute.components().count() - 1;
    for (index, component) in absolute.components().enumerate() {
        current.push(component);
        let metadata = match std::fs::symlink_metadata(&current) {
            Ok(m) => m,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().mode(0o700).create(&current) {
                    // Someone made it at the same moment: the checks below decide.
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    other => other.map_err(crate::PathError::at("creating", &current))?,
                }
                std::fs::symlink_metadata(&current)
                    .map_err(crate::PathError::at("inspecting", &current))?
            }
            Err(err) => return Err(crate::PathError::at("inspecting", &current)(err).into()),
        };
        // "/" itself is never made private, even when asked for.
        check_component(&current, &metadata, ours, index == last && index > 0)?;
    }
    Ok(())
}

/// [`private_dir`], through which the members of group `gid` may reach the files they are let
/// to (mode 0710, the group `gid`): they can neither list it nor create, remove or replace
/// anything in it. The daemon's control socket lives in such a directory when it has a socket
/// group; everything else there stays 0600.
pub fn shared_dir(path: &Path, gid: u32) -> Result<(), PrivateDirError> {
    private_dir(path)?;
    nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
        .map_err(|e| crate::PathError::at("giving its group", path)(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o710))
        .map_err(crate::PathError::at("opening to its group", path))?;
    Ok(())
}

fn check_component(
    path: &Path,
    metadata: &std::fs::Metadata,
    ours: u32,
    is_last: bool,
) -> Result<(), PrivateDirError> {
    if metadata.file_type().is_symlink() {
        return Err(PrivateDirError::Symlink {
            path: path.to_owned(),
        });
    }
    if !metadata.is_dir() {
        return Err(PrivateDirError::NotADirectory {
            path: path.to_owned(),
        });
    }
    let owner = metadata.uid();
    let mode = metadata.mode() & 0o7777;
    if is_last {
        if owner != ours {
            return Err(PrivateDirError::ForeignOwner {
                path: path.to_owned(),
                owner,
                ours,
            });
        }
        // 0710 is left as it is: group search alone lets the daemon's socket group reach the
        // control socket (see `shared_dir`), and lists, creates or replaces nothing.
        if mode & 0o077 != 0 && mode != 0o710 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(crate::PathError::at("restricting", path))?;
        }
        return Ok(());
    }
    if owner != 0 && owner != ours {
        return Err(PrivateDirError::ForeignOwner {
            path: path.to_owned(),
            owner,
            ours,
        });
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(PrivateDirError::OpenToOthers {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// A lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{} is locked by another process{}", path.display(), held_by(holder))]
    Held {
        /// The lock.
        path: PathBuf,
        /// Who holds it, when `/proc/locks` says.
        holder: Option<u32>,
    },
    /// Locking failed for another reason.
    #[error(transparent)]
    Failed(#[from] crate::PathError),
}

/// " (pid N)" when the holder of a lock is known: the part of a "held" message that names it.
pub fn held_by(holder: &Option<u32>) -> String {
    holder.map_or_else(String::new, |pid| format!(" (pid {pid})"))
}

/// Opens (or creates, 0600) a lock file, never through a planted symlink. Its directory should
/// be a [`private_dir`]: then nobody else can open it to hold the lock.
pub fn open_lock_file(path: &Path) -> Result<File, crate::PathError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(crate::PathError::at("opening", path))
}

/// Takes an exclusive lock on `file` (opened from `path`) without waiting.
pub fn lock_exclusive(file: File, path: &Path) -> Result<Flock<File>, LockError> {
    let identity = file.metadata().ok().map(|m| (m.dev(), m.ino()));
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            LockError::Held {
                path: path.to_owned(),
                holder: identity.and_then(|(dev, ino)| lock_holder(dev, ino)),
            }
        } else {
            crate::PathError::at("locking", path)(errno.into()).into()
        }
    })
}

/// The pid `/proc/locks` names for a flock on the file `(dev, ino)`.
fn lock_holder(dev: u64, ino: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let wanted = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    holder_in(&locks, &wanted)
}

/// In `/proc/locks` text (`1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`), the pid of a
/// flock on `file` (`maj:min:inode`, as that file writes it).
fn holder_in(locks: &str, file: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed with "->" before their fields: not the holder.
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&file))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

/// Binds a Unix socket at `path` that only its owner may connect to. It is bound under a
/// temporary name, restricted to 0600 and renamed into place, so nobody can connect while it
/// is still open wider (a umask would do it too, but the umask is the whole process's, and
/// other threads create files). A file left at `path` is replaced: callers hold the lock that
/// makes them its one owner.
pub fn bind_private_socket(
    path: &Path,
) -> Result<std::os::unix::net::UnixListener, crate::PathError> {
    bind_socket(path, None)
}

/// [`bind_private_socket`], or with `group` one the members of that group may connect to too
/// (0660): the daemon's socket for operators who are not root.
pub fn bind_socket(
    path: &Path,
    group: Option<u32>,
) -> Result<std::os::unix::net::UnixListener, crate::PathError> {
    let temporary = crate::with_suffix(path, &format!(".{}.new", std::process::id()));
    match std::fs::remove_file(&temporary) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(crate::PathError::at("removing stale", &temporary)(err))
        }
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(&temporary)
        .map_err(crate::PathError::at("binding", &temporary))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .map_err(crate::PathError::at("restricting", &temporary))
        .and_then(|()| match group {
            Some(gid) => {
                nix::unistd::chown(&temporary, None, Some(nix::unistd::Gid::from_raw(gid)))
                    .map_err(|e| crate::PathError::at("giving its group", &temporary)(e.into()))
            }
            None => Ok(()),
        })
        .and_then(|()| {
            std::fs::rename(&temporary, path).map_err(crate::PathError::at("placing", path))
        });
    if let Err(err) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    listener
        .set_nonblocking(true)
        .map_err(crate::PathError::at("configuring", path))?;
    Ok(listener)
}

/// Writes `bytes` to `path` through a new file only its owner can read, renamed over the old
/// one: a crash leaves one or the other whole, never a mix.
/// `synced`: fsync before the rename (the replaced file's pages are then clean, too).
pub(crate) fn replace_private(
    path: &Path,
    bytes: &[u8],
    synced: bool,
) -> Result<(), crate::PathError> {
    let temporary = crate::with_suffix(path, ".new");
    write_private(&temporary, bytes, synced)
        .map_err(crate::PathError::at("writing", &temporary))?;
    std::fs::rename(&temporary, path).map_err(crate::PathError::at("replacing", path))
}

/// Writes `bytes` to a new file only its owner can read, never through a planted symlink.
fn write_private(path: &Path, bytes: &[u8], synced: bool) -> io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(bytes)?;
    if synced {
        file.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_is_private_and_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace_private(&path, b"one", true).unwrap();
        replace_private(&path, b"two", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!crate::with_suffix(&path, ".new").exists());
    }

    #[test]
    fn a_symlink_planted_where_the_new_file_goes_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, crate::with_suffix(&path, ".new")).unwrap();
        assert!(replace_private(&path, b"x", true).is_err());
        assert!(!target.exists());
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_private_dir_is_made_0700_with_its_missing_parents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/c");
        private_dir(&path).unwrap();
        assert_eq!(mode_of(&path), 0o700);
        assert_eq!(mode_of(&dir.path().join("a")), 0o700);
        // Using it again changes nothing and succeeds.
        private_dir(&path).unwrap();
    }

    #[test]
    fn our_own_dir_open_wider_is_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&path).unwrap();
        assert_eq!(mode_of(&path), 0o700);
    }

    #[test]
    fn a_symlink_on_the_way_is_refused_and_nothing_is_made_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = private_dir(&link.join("state")).unwrap_err();
        assert!(
            matches!(&err, PrivateDirError::Symlink { path } if *path == link),
            "{err}"
        );
        assert!(!target.join("state").exists());
        assert!(matches!(
            private_dir(&link).unwrap_err(),
            PrivateDirError::Symlink { .. }
        ));
    }

    #[test]
    fn a_file_where_a_dir_goes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            private_dir(&file.join("state")).unwrap_err(),
            PrivateDirError::NotADirectory { .. }
        ));
    }

    #[test]
    fn a_dir_writable_by_others_without_the_sticky_bit_is_refused_on_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&open.join("state")).unwrap_err();
        assert!(
            matches!(err, PrivateDirError::OpenToOthers { mode: 0o777, .. }),
            "{err}"
        );
        assert!(!open.join("state").exists());
        // Sticky, as /tmp and a default bpffs are: nobody can rename our entry away.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&open.join("state")).unwrap();
    }

    /// Needs root, to give a directory away; fails without it.
    #[test]
    fn a_dir_another_user_made_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join("hotswap");
        std::fs::create_dir(&planted).unwrap();
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&planted, Some(nobody), None)
            .expect("giving a directory to uid 65534 needs root");
        let err = private_dir(&planted.join("state")).unwrap_err();
        assert!(
            matches!(&err, PrivateDirError::ForeignOwner { owner: 65534, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        let err = private_dir(&planted).unwrap_err();
        assert!(matches!(err, PrivateDirError::ForeignOwner { .. }), "{err}");
    }

    #[test]
    fn a_held_lock_names_its_holder_and_an_unheld_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = lock_exclusive(open_lock_file(&path).unwrap(), &path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        match lock_exclusive(open_lock_file(&path).unwrap(), &path) {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(held);
        lock_exclusive(open_lock_file(&path).unwrap(), &path).unwrap();
    }

    #[test]
    fn a_lock_file_is_never_opened_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let path = dir.path().join("x.lock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(open_lock_file(&path).is_err());
        assert!(!target.exists());
    }

    #[test]
    fn the_holder_is_read_from_proc_locks_lines() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:2a:5678 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4321 00:2a:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 77 fd:01:5678 0 EOF\n";
        assert_eq!(holder_in(locks, "00:2a:5678"), Some(1234));
        assert_eq!(holder_in(locks, "fd:01:5678"), Some(77));
        assert_eq!(holder_in(locks, "00:2a:1"), None);
    }

    #[test]
    fn a_private_socket_is_0600_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        std::fs::write(&path, b"stale").unwrap();
        let listener = bind_private_socket(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
