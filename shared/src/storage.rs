//! Opening a sled 0.34 database that a crash, a power cut or a full disk left damaged.

use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Why a database could not be opened, even after its snapshots were dropped.
#[derive(Debug)]
pub enum OpenFailure<E> {
    /// Not damage (permissions, a full disk, a lock held by another process): the error
    /// of the first attempt, nothing was changed.
    Error(E),
    /// sled reported corruption or panicked, twice; what it said the second time.
    Damaged(String),
}

/// Opens a sled database in `dir` with `open`, repairing what sled 0.34 cannot:
///
/// - sled takes the name-wise last `snap.*` file as its snapshot, unfinished ones
///   (`snap.<lsn>.generating`) included, and refuses to open ("Read corrupted data") when
///   it is torn: a snapshot write cut by a full disk or a crash bricked the database
///   (found by the chaos runner's disk-full + kill trials);
/// - after a power cut, sled can panic while building its page table from a snapshot
///   and the log ("tried to serialize Uninitialized", `serialization.rs`; found by the
///   chaos runner's power-cut trials).
///
/// A snapshot only saves sled replaying its log, so when the first attempt fails with an
/// error `is_damage` accepts, or panics, every snapshot file is removed and the open is
/// tried once more. sled's lock file is taken before either failure, so no other
/// process has the database open when its files are removed.
pub fn open_repairing<T, E: Display>(
    dir: &Path,
    is_damage: impl Fn(&E) -> bool,
    open: impl Fn() -> Result<T, E>,
) -> Result<T, OpenFailure<E>> {
    match attempt(&open) {
        Ok(db) => return Ok(db),
        Err(Attempt::Error(e)) if !is_damage(&e) => return Err(OpenFailure::Error(e)),
        Err(failed) => {
            let removed = remove_snapshots(dir);
            tracing::warn!(
                dir = %dir.display(),
                error = %failed.describe(),
                removed = removed.len(),
                "sled could not open the database; removed its snapshots and trying again"
            );
        }
    }
    match attempt(&open) {
        Ok(db) => Ok(db),
        Err(Attempt::Error(e)) if !is_damage(&e) => Err(OpenFailure::Error(e)),
        Err(failed) => Err(OpenFailure::Damaged(failed.describe())),
    }
}

enum Attempt<E> {
    Error(E),
    Panicked(String),
}

impl<E: Display> Attempt<E> {
    fn describe(&self) -> String {
        match self {
            Attempt::Error(e) => e.to_string(),
            Attempt::Panicked(message) => format!("sled panicked: {message}"),
        }
    }
}

fn attempt<T, E>(open: &impl Fn() -> Result<T, E>) -> Result<T, Attempt<E>> {
    match catch_unwind(AssertUnwindSafe(open)) {
        Ok(result) => result.map_err(Attempt::Error),
        Err(panic) => Err(Attempt::Panicked(panic_message(panic.as_ref()))),
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// Removes sled's snapshot files in `dir` (`snap.*`, finished or not) and returns them.
fn remove_snapshots(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("snap.") {
            let path = entry.path();
            if std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn dir_with(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in names {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        dir
    }

    #[test]
    fn damage_or_a_panic_removes_the_snapshots_and_tries_once_more() {
        for panics in [false, true] {
            let dir = dir_with(&["snap.00A0", "snap.00B0.generating", "db", "conf"]);
            let tries = Cell::new(0);
            let opened = open_repairing(
                dir.path(),
                |e: &String| e.starts_with("corrupt"),
                || {
                    tries.set(tries.get() + 1);
                    match (tries.get(), panics) {
                        (1, true) => panic!("tried to serialize Uninitialized"),
                        (1, false) => Err("corrupt".to_string()),
                        _ => Ok(dir.path().join("snap.00A0").exists()),
                    }
                },
            );
            assert!(matches!(opened, Ok(false)), "opened without snapshots");
            assert_eq!(tries.get(), 2);
            for name in ["db", "conf"] {
                assert!(dir.path().join(name).exists(), "{name}");
            }
        }
    }

    #[test]
    fn other_errors_change_nothing_and_lasting_damage_is_reported() {
        let dir = dir_with(&["snap.00A0", "db"]);
        let opened: Result<(), _> = open_repairing(
            dir.path(),
            |e: &String| e.starts_with("corrupt"),
            || Err("permission denied".to_string()),
        );
        assert!(matches!(opened, Err(OpenFailure::Error(e)) if e == "permission denied"));
        assert!(dir.path().join("snap.00A0").exists(), "left alone");

        let opened: Result<(), _> =
            open_repairing(dir.path(), |_: &String| true, || Err("corrupt".to_string()));
        assert!(matches!(opened, Err(OpenFailure::Damaged(e)) if e == "corrupt"));
        assert!(!dir.path().join("snap.00A0").exists(), "snapshots removed");
    }
}
