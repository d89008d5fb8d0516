//! Files only their owner may read, replaced whole: the one way hotswap writes state (the
//! uds/reuseport backends' state files, a supervisor's record of its generations).
//!
//! Replacing a file can block for a long time on a busy disk: the replaced inode waits for its
//! pages' writeback (measured: `rename` in `folio_wait_writeback` from `ext4_evict_inode`, for
//! seconds, while the lifecycle tests ran on ext4). Writers that must not stall (a supervisor)
//! call this off their runtime's thread.

use std::{io, path::Path};

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
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
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
}
