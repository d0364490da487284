//! Power cuts: the `powercut` LD_PRELOAD shim (`tests/powercut/powercut.c`, built here
//! with the system's C compiler) keeps a shadow of every file a server writes under its
//! data dir, holding only what fsync/fdatasync covered. [`PowerRig::cut`], after the
//! process was `kill -9`ed, puts the shadows in place of the files: the data dir as a
//! machine's power cut would leave it (writes not synced are gone, `sync_file_range`
//! included), where a process kill keeps everything in the page cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The shim, compiled once per test process.
pub fn shim() -> PathBuf {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let source = crate::workspace_root().join("tests/powercut/powercut.c");
        let dir = std::env::temp_dir().join(format!("shop-powercut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("shim dir");
        let out = dir.join("libpowercut.so");
        let status = Command::new("cc")
            .args([
                "-O2",
                "-Wall",
                "-Wno-format-truncation",
                "-shared",
                "-fPIC",
                "-o",
            ])
            .arg(&out)
            .arg(&source)
            .args(["-ldl", "-lpthread"])
            .status()
            .expect("run cc (the power-cut shim is C; install a C compiler)");
        assert!(status.success(), "compiling {} failed", source.display());
        out
    })
    .clone()
}

/// The shim's settings for one server's data dir, and the cut.
pub struct PowerRig {
    root: PathBuf,
    shadow: tempfile::TempDir,
}

impl PowerRig {
    /// A rig for the data dir `root` (created if missing: the shim resolves it).
    pub fn new(root: &Path) -> PowerRig {
        std::fs::create_dir_all(root).expect("data dir");
        PowerRig {
            root: root.canonicalize().expect("canonical data dir"),
            shadow: tempfile::Builder::new()
                .prefix("shop-shadow-")
                .tempdir()
                .expect("shadow dir"),
        }
    }

    /// The environment that puts a server under the rig.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), shim().display().to_string()),
            ("POWERCUT_ROOT".into(), self.root.display().to_string()),
            (
                "POWERCUT_SHADOW".into(),
                self.shadow.path().display().to_string(),
            ),
        ]
    }

    /// After a process death without a power cut: the kernel writes the dead process's
    /// unsynced pages back by itself, and a later fsync of the file (by the next process)
    /// covers them too. The rig forgets its shadows; the next process copies the files
    /// as they are.
    pub fn settle(&self) {
        for entry in std::fs::read_dir(self.shadow.path()).expect("shadow dir") {
            std::fs::remove_file(entry.expect("shadow entry").path()).expect("remove shadow");
        }
    }

    /// The power cut, once the server was killed: every file it wrote becomes what was
    /// synced of it. Returns how many bytes were lost (files' sizes or contents that
    /// differed from their synced state).
    pub fn cut(&self) -> u64 {
        let mut lost = 0u64;
        let entries = std::fs::read_dir(self.shadow.path()).expect("shadow dir");
        for entry in entries {
            let entry = entry.expect("shadow entry");
            let name = entry.file_name().to_string_lossy().replace('%', "/");
            let path = self.root.join(name);
            let durable = std::fs::read(entry.path()).expect("read shadow");
            let now = std::fs::read(&path).unwrap_or_default();
            if now != durable {
                lost += differing_bytes(&now, &durable);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).expect("dir");
                }
                std::fs::write(&path, &durable).expect("restore");
            }
            std::fs::remove_file(entry.path()).expect("remove shadow");
        }
        lost
    }
}

fn differing_bytes(a: &[u8], b: &[u8]) -> u64 {
    let common = a.len().min(b.len());
    let changed = a[..common]
        .iter()
        .zip(&b[..common])
        .filter(|(x, y)| x != y)
        .count();
    (changed + a.len().max(b.len()) - common) as u64
}
