//! The top-level entries of a task's root that get fresh file systems instead of the host's.
//! Both the mount plan (which skips them when it binds the root's entries) and the socket list
//! (which leaves the sockets under them out of what the template shows) ask here, so neither
//! needs the other.
//!
//! /run holds the host's runtime sockets (D-Bus, container runtimes, this node's API), which a
//! read-only mount would not keep a task from connecting to; it gets an empty tmpfs too.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const ENTRIES: &[&str] = &["proc", "sys", "dev", "run", "tmp", "workspace"];

/// Whether `name`, a top-level entry of the root, gets a fresh file system.
pub(super) fn is_fresh(name: &OsStr) -> bool {
    ENTRIES.iter().any(|f| f.as_bytes() == name.as_bytes())
}

/// Whether an absolute host path lies under one of the fresh entries of the host root.
pub(super) fn under_fresh(path: &Path) -> bool {
    path.components()
        .nth(1)
        .is_some_and(|top| is_fresh(top.as_os_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_fresh_looks_at_the_top_entry_only() {
        assert!(under_fresh(Path::new("/run/dbus/system_bus_socket")));
        assert!(under_fresh(Path::new("/tmp/x.sock")));
        assert!(!under_fresh(Path::new("/var/run/x.sock")));
        assert!(!under_fresh(Path::new("/runner/x.sock")));
        assert!(!under_fresh(Path::new("/")));
    }
}
