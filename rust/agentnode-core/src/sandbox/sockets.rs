//! The host's bound pathname unix sockets, which a task must not reach through the read-only
//! host root: a read-only mount does not stop `connect()` on a socket file (the kernel's
//! read-only check skips sockets) and Landlock up to ABI 7 has no right over it. The mount plan
//! puts /dev/null over each one (`Op::Mask`), in the template and over the binds a task asks for.
//!
//! The list comes from `/proc/net/unix` (every socket bound in this network namespace, with its
//! path), not from a walk of the host's files (900k entries here, seconds), and is read again
//! every [`REFRESH`] by the template's watcher: a socket bound after the template was built
//! makes it stale, so tasks started from then on get it masked.

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::fresh::under_fresh;

/// How often the watcher reads the list again.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The last read: every bound socket file, and those of them the template root shows (outside
/// its fresh top-level entries), each replaced only when it changes.
struct Bound {
    all: Arc<Vec<PathBuf>>,
    in_root: Arc<Vec<PathBuf>>,
}

static BOUND: Mutex<Option<Bound>> = Mutex::new(None);

fn split(all: Vec<PathBuf>) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let in_root = all.iter().filter(|p| !under_fresh(p)).cloned().collect();
    (all, in_root)
}

fn with_bound<T>(f: impl FnOnce(&Bound) -> T) -> T {
    let mut guard = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    let bound = guard.get_or_insert_with(|| {
        let (all, in_root) = split(read());
        Bound {
            all: Arc::new(all),
            in_root: Arc::new(in_root),
        }
    });
    f(bound)
}

/// The host's bound socket files as this process last read them (read first if never).
pub fn bound() -> Arc<Vec<PathBuf>> {
    with_bound(|b| b.all.clone())
}

/// Those of [`bound`] the template root shows: sockets come and go in /tmp and /run all the
/// time, and must not make the template (and the copies and zygotes made from it) stale.
pub fn in_root() -> Arc<Vec<PathBuf>> {
    with_bound(|b| b.in_root.clone())
}

/// Reads the list again; true when the sockets the template root shows changed.
pub fn refresh() -> bool {
    let (all, in_root) = split(read());
    let mut guard = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(b) = guard.as_mut() else {
        *guard = Some(Bound {
            all: Arc::new(all),
            in_root: Arc::new(in_root),
        });
        return true;
    };
    if *b.all != all {
        b.all = Arc::new(all);
    }
    if *b.in_root == in_root {
        return false;
    }
    b.in_root = Arc::new(in_root);
    true
}

/// Every path in `/proc/net/unix` that is a socket file now, canonical (a mask must not follow
/// a symlink onto another path), sorted, without repeats.
fn read() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = text
        .lines()
        .skip(1)
        .filter_map(path_field)
        .filter(|p| p.starts_with('/'))
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()))
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The path of a `/proc/net/unix` line: what follows its seven fields (spaces and all); an
/// abstract name starts with '@', an unbound socket has none.
fn path_field(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    for _ in 0..7 {
        rest = rest[rest.find(' ')?..].trim_start();
    }
    (!rest.is_empty()).then_some(rest)
}

/// The sockets of `bound` under `dir` (a rootfs or a bind's source), as paths relative to it.
pub fn under<'a>(bound: &'a [PathBuf], dir: &Path) -> impl Iterator<Item = &'a Path> + 'a {
    // No lookup on a start when there is nothing to find (a path walk per bind otherwise).
    let dir = if bound.is_empty() {
        PathBuf::new()
    } else {
        std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())
    };
    bound.iter().filter_map(move |p| p.strip_prefix(&dir).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_field_keeps_spaces_and_skips_unbound() {
        let bound = "0000000000000000: 00000002 00000000 00010000 0001 01 12345 /var/lib/a b.sock";
        let unbound = "0000000000000000: 00000003 00000000 00000000 0001 03 12346";
        assert_eq!(path_field(bound), Some("/var/lib/a b.sock"));
        assert_eq!(path_field(unbound), None);
    }
}
