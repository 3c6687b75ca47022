//! Who could change the script that root is about to run.
//!
//! bt2immu runs bpftrace as root with the user's script. If a non-root user can modify the
//! script, or replace it by renaming entries in any directory above it, that user can make root
//! run their probes (and read any process's memory). So, as root, the script file and every
//! directory from it up to `/` must be writable by root alone.
//!
//! The rule is a pure function of (mode, uid, gid, is_dir) so it can be tested without root;
//! [`path_problems`] applies it to a real path.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The metadata the rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// `st_mode` (permission bits, sticky bit; the file type bits are ignored).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub is_dir: bool,
}

impl FileMeta {
    pub fn from_metadata(m: &std::fs::Metadata) -> Self {
        FileMeta {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            is_dir: m.is_dir(),
        }
    }
}

/// Why a non-root user could change a path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "issue", rename_all = "snake_case")]
pub enum PermIssue {
    /// The owner is not root: the owner can write it, or chmod it to writable.
    OwnedByNonRoot { uid: u32 },
    /// Group-writable and the group is not root's (gid 0).
    GroupWritable { gid: u32 },
    /// Writable by everyone (for a directory: without the sticky bit, which would stop others
    /// from renaming or deleting entries they do not own).
    WorldWritable,
}

const STICKY: u32 = 0o1000;

/// The rule: which issues make `meta` modifiable by someone other than root.
///
/// A sticky directory (like `/tmp`, mode 1777) is accepted above a root-owned file: others may
/// add entries there but cannot rename or remove root's. Group write by group 0 is accepted:
/// membership of the root group is an administrator's choice.
pub fn permission_issues(meta: &FileMeta) -> Vec<PermIssue> {
    let mut out = Vec::new();
    if meta.uid != 0 {
        out.push(PermIssue::OwnedByNonRoot { uid: meta.uid });
    }
    let sticky_dir = meta.is_dir && meta.mode & STICKY != 0;
    if meta.mode & 0o020 != 0 && meta.gid != 0 && !sticky_dir {
        out.push(PermIssue::GroupWritable { gid: meta.gid });
    }
    if meta.mode & 0o002 != 0 && !sticky_dir {
        out.push(PermIssue::WorldWritable);
    }
    out
}

/// One path that a non-root user could change, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PermProblem {
    pub path: PathBuf,
    #[serde(flatten)]
    pub issue: PermIssue,
}

impl PermProblem {
    /// A shell command that fixes it.
    pub fn fix(&self) -> String {
        let p = shell_escape::escape(self.path.to_string_lossy());
        match self.issue {
            PermIssue::OwnedByNonRoot { .. } => format!("chown root {p}"),
            PermIssue::GroupWritable { .. } => format!("chmod g-w {p}"),
            PermIssue::WorldWritable => format!("chmod o-w {p}"),
        }
    }
}

impl std::fmt::Display for PermProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.issue {
            PermIssue::OwnedByNonRoot { uid } => format!("is owned by uid {uid}, not root"),
            PermIssue::GroupWritable { gid } => format!("is writable by group {gid}"),
            PermIssue::WorldWritable => "is writable by every user".to_string(),
        };
        write!(f, "{} {what} (fix: {})", self.path.display(), self.fix())
    }
}

/// Applies [`permission_issues`] to `path` (following symlinks) and to every directory above it,
/// both along the path as given (made absolute) and along its canonical form, so that neither a
/// symlink nor a directory on the way can be swapped by a non-root user.
pub fn path_problems(path: &Path) -> std::io::Result<Vec<PermProblem>> {
    let abs = std::path::absolute(path)?;
    let canon = std::fs::canonicalize(path)?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for start in [abs, canon] {
        let mut cur: Option<&Path> = Some(&start);
        while let Some(p) = cur {
            if seen.insert(p.to_path_buf()) {
                // The file itself through symlinks; a symlink on the way is judged by the
                // directory holding it (the link itself has no meaningful mode).
                let meta = std::fs::metadata(p)?;
                for issue in permission_issues(&FileMeta::from_metadata(&meta)) {
                    out.push(PermProblem {
                        path: p.to_path_buf(),
                        issue,
                    });
                }
            }
            cur = p.parent();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(mode: u32, uid: u32, gid: u32, is_dir: bool) -> FileMeta {
        FileMeta {
            mode,
            uid,
            gid,
            is_dir,
        }
    }

    #[test]
    fn the_rule() {
        assert!(permission_issues(&m(0o100644, 0, 0, false)).is_empty());
        assert!(permission_issues(&m(0o40755, 0, 0, true)).is_empty());
        // /tmp: sticky and world-writable, fine as a directory above.
        assert!(permission_issues(&m(0o41777, 0, 0, true)).is_empty());
        // A world-writable file is never fine, sticky or not.
        assert_eq!(
            permission_issues(&m(0o101666, 0, 0, false)),
            [PermIssue::WorldWritable]
        );
        assert_eq!(
            permission_issues(&m(0o100664, 0, 100, false)),
            [PermIssue::GroupWritable { gid: 100 }]
        );
        assert!(permission_issues(&m(0o100664, 0, 0, false)).is_empty());
        assert_eq!(
            permission_issues(&m(0o40777, 1000, 1000, true)),
            [
                PermIssue::OwnedByNonRoot { uid: 1000 },
                PermIssue::GroupWritable { gid: 1000 },
                PermIssue::WorldWritable
            ]
        );
        assert_eq!(
            permission_issues(&m(0o100600, 1000, 0, false)),
            [PermIssue::OwnedByNonRoot { uid: 1000 }]
        );
    }

    #[test]
    fn fixes_are_shell_safe() {
        let p = PermProblem {
            path: PathBuf::from("/tmp/a b/x.bt"),
            issue: PermIssue::WorldWritable,
        };
        assert_eq!(p.fix(), "chmod o-w '/tmp/a b/x.bt'");
    }
}
