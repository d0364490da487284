//! Working around sled 0.34 at open.

use std::path::{Path, PathBuf};

/// Removes the snapshot files sled left unfinished in `dir` (`snap.<lsn>.generating`:
/// sled writes a snapshot there and renames it when complete), and returns them.
///
/// sled 0.34 takes the name-wise last `snap.*` file as its snapshot, unfinished ones
/// included, and refuses to open ("Read corrupted data") when it is torn: a snapshot
/// write cut by a full disk or a crash bricked the database (found by the chaos runner's
/// disk-full + kill trials). A snapshot only saves replaying the log, so an unfinished
/// one is dropped and the open retried. Call only after sled refused to open: sled's
/// lock file then tells no other process has the database open.
pub fn remove_unfinished_snapshots(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let path = entry.path();
            if std::fs::remove_file(&path).is_ok() {
                tracing::warn!(path = %path.display(), "removed an unfinished sled snapshot");
                removed.push(path);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unfinished_snapshots_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["snap.00A0", "snap.00B0.generating", "db", "conf"] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        let removed = remove_unfinished_snapshots(dir.path());
        assert_eq!(removed, vec![dir.path().join("snap.00B0.generating")]);
        for name in ["snap.00A0", "db", "conf"] {
            assert!(dir.path().join(name).exists(), "{name}");
        }
    }
}
