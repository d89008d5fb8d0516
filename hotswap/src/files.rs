//! Files only their owner may read, replaced whole: the one way hotswap writes state (the
//! uds/reuseport backends' state files, a supervisor's record of its generations).

use std::{io, path::Path};

/// What a replaced file must survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Survives {
    /// A crash of the writing process (the page cache keeps it): write and rename, no fsync.
    /// For state that means nothing after a reboot anyway, written often, by a process that
    /// must not stall on a busy disk (a supervisor's record: its generations die with the host).
    ProcessCrash,
    /// A crash of the host too: fsync before the rename.
    HostCrash,
}

/// Writes `bytes` to `path` through a new file only its owner can read, renamed over the old
/// one: a crash leaves one or the other whole, never a mix.
pub(crate) fn replace_private(
    path: &Path,
    bytes: &[u8],
    survives: Survives,
) -> Result<(), crate::PathError> {
    let temporary = crate::with_suffix(path, ".new");
    write_private(&temporary, bytes, survives)
        .map_err(crate::PathError::at("writing", &temporary))?;
    std::fs::rename(&temporary, path).map_err(crate::PathError::at("replacing", path))
}

/// Writes `bytes` to a new file only its owner can read, never through a planted symlink.
fn write_private(path: &Path, bytes: &[u8], survives: Survives) -> io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(bytes)?;
    match survives {
        Survives::HostCrash => file.sync_all(),
        Survives::ProcessCrash => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_is_private_and_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace_private(&path, b"one", Survives::HostCrash).unwrap();
        replace_private(&path, b"two", Survives::ProcessCrash).unwrap();
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
        assert!(replace_private(&path, b"x", Survives::HostCrash).is_err());
        assert!(!target.exists());
    }
}
