//! Names that come from outside (a Hub repo's file list and commit, an index's `weight_map`, a
//! checkpoint directory's entries) turned into paths under a directory of ours, or refused.
//!
//! A Hub repo is untrusted input: anyone can publish one and an `HF_ENDPOINT` mirror can be
//! compromised. A name is accepted when it is a relative path of plain components separated by
//! `/`: none empty, `.` or `..`; no backslash, NUL or other control character, no drive prefix
//! (`C:`); at most [`MAX_COMPONENT_BYTES`] per component and [`MAX_NAME_BYTES`] in all. The joined
//! path's existing directories are then resolved (symlinks followed) and must still lie under the
//! root, so a directory link planted inside the root cannot carry a write outside it. Whether the
//! last component may itself be a link is the caller's rule (a Hub snapshot's files are links into
//! the repo's `blobs/`, checked by [`resolves_under`]).

use std::path::{Component, Path, PathBuf};

/// The longest name accepted, in bytes (Linux's `PATH_MAX` is 4096; the Hub's names are short).
pub const MAX_NAME_BYTES: usize = 1024;
/// The longest component accepted, in bytes (`NAME_MAX` on Linux, macOS and Windows).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// A name refused by [`join_under`] or [`file_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the name {name:?} {why}; names from a file or the network must be relative paths that stay \
     inside their directory (a hostile or damaged repo or file?)"
)]
pub struct UnsafeName {
    /// The name as given (printed with escapes, so control characters show).
    pub name: String,
    pub why: &'static str,
}

fn refuse(name: &str, why: &'static str) -> UnsafeName {
    UnsafeName {
        name: name.chars().take(200).collect(),
        why,
    }
}

/// Checks one component of a name.
fn check_component(name: &str, c: &str) -> Result<(), UnsafeName> {
    match c {
        "" => Err(refuse(
            name,
            "has an empty component (`//`, or a leading or trailing `/`)",
        )),
        "." | ".." => Err(refuse(name, "has a `.` or `..` component")),
        _ if c.len() > MAX_COMPONENT_BYTES => Err(refuse(name, "has a component over 255 bytes")),
        _ if c.contains('\\') => Err(refuse(name, "contains a backslash")),
        _ if c.chars().any(char::is_control) => {
            Err(refuse(name, "contains NUL or another control character"))
        }
        // `C:` (a Windows drive) and `C:foo` (drive-relative); `:` elsewhere is a plain character
        // on Unix but an alternate data stream on NTFS, so it is refused everywhere.
        _ if c.contains(':') => Err(refuse(name, "contains `:` (a drive or stream prefix)")),
        _ => Ok(()),
    }
}

/// Checks `name` lexically (see the module doc) and returns its components.
pub fn check_name(name: &str) -> Result<Vec<&str>, UnsafeName> {
    if name.is_empty() {
        return Err(refuse(name, "is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(refuse(name, "is over 1024 bytes"));
    }
    if name.starts_with('/') {
        return Err(refuse(name, "is an absolute path"));
    }
    let parts: Vec<&str> = name.split('/').collect();
    for c in &parts {
        check_component(name, c)?;
    }
    Ok(parts)
}

/// `name` as a single file name (no `/`), checked as [`check_name`] does.
pub fn file_name(name: &str) -> Result<&str, UnsafeName> {
    match check_name(name)?.as_slice() {
        [one] => Ok(one),
        _ => Err(refuse(name, "is not a single file name (it contains `/`)")),
    }
}

/// `root/name` for an untrusted `name`, or why not: the name is checked lexically, then the part
/// of the joined path that exists, up to the name's last component, must resolve (symlinks
/// followed) to a directory under `root` resolved the same way.
pub fn join_under(root: &Path, name: &str) -> Result<PathBuf, UnsafeName> {
    let parts = check_name(name)?;
    let mut path = root.to_path_buf();
    for p in &parts {
        path.push(p);
    }
    // Lexically the join only adds normal components (a belt to the check's braces).
    if path.strip_prefix(root).map_or(true, |rest| {
        rest.components()
            .any(|c| !matches!(c, Component::Normal(_)))
    }) {
        return Err(refuse(name, "leaves its directory"));
    }
    if let Some(parent) = path.parent()
        && !existing_part_resolves_under(parent, root)
    {
        return Err(refuse(
            name,
            "goes through a directory link that leads outside its directory",
        ));
    }
    Ok(path)
}

/// Whether the deepest existing ancestor of `path` (itself included) resolves under `root`: true
/// when nothing of it exists below `root`, or `root` does not exist yet.
fn existing_part_resolves_under(path: &Path, root: &Path) -> bool {
    let Ok(root) = root.canonicalize() else {
        return true;
    };
    let mut p = path;
    loop {
        if std::fs::symlink_metadata(p).is_ok() {
            return p.canonicalize().is_ok_and(|c| c.starts_with(&root));
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return true,
        }
    }
}

/// Whether `path` exists and resolves (every symlink followed) to a place under `dir` (resolved the
/// same way).
pub fn resolves_under(path: &Path, dir: &Path) -> bool {
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_join_and_hostile_ones_are_refused() {
        let root = Path::new("/cache/snap");
        assert_eq!(
            join_under(root, "model-00001-of-00002.safetensors").unwrap(),
            root.join("model-00001-of-00002.safetensors")
        );
        assert_eq!(
            join_under(root, "original/params.json").unwrap(),
            root.join("original").join("params.json")
        );
        for bad in [
            "",
            "../x",
            "a/../../x",
            "a/./b",
            ".",
            "..",
            "/etc/passwd",
            "//x",
            "a//b",
            "a/",
            "a\\..\\b",
            "C:\\x",
            "C:x",
            "a\0b",
            "a\nb",
            &"x".repeat(256),
            &["a"; 600].join("/"),
        ] {
            assert!(join_under(root, bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(file_name("a.json").unwrap(), "a.json");
        assert!(file_name("a/b.json").is_err());
        let e = join_under(root, "../../outside").unwrap_err().to_string();
        assert!(e.contains("\"../../outside\"") && e.contains(".."), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_link_inside_the_root_cannot_lead_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("sub")).unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        assert!(join_under(&root, "sub/x.safetensors").is_err());
        assert!(join_under(&root, "sub/deeper/x").is_err());
        assert!(join_under(&root, "real/x").is_ok());
        assert!(join_under(&root, "new/dirs/x").is_ok());
        // The last component may be a link; whether it may lead out is the caller's rule.
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("leaf")).unwrap();
        let leaf = join_under(&root, "leaf").unwrap();
        assert!(!resolves_under(&leaf, &root));
        assert!(resolves_under(&root.join("real"), &root));
    }

    /// A component: printable ASCII and some non-ASCII, with the characters that matter.
    fn component() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9._:\\\\ \\-é\u{0}\n]{0,12}|\\.|\\.\\.").unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the name, an accepted join adds only normal components to the root, as many as
        /// the name has, and never `.`/`..`; and a name of safe components is always accepted.
        #[test]
        fn joins_stay_under_the_root(parts in proptest::collection::vec(component(), 0..6),
                                     lead in proptest::bool::ANY) {
            let name = format!("{}{}", if lead { "/" } else { "" }, parts.join("/"));
            let root = Path::new("/r/o");
            let safe = !lead && !parts.is_empty() && parts.iter().all(|c| {
                !c.is_empty() && c != "." && c != ".." && !c.contains(['\\', '\0', '\n', ':'])
            });
            match join_under(root, &name) {
                Ok(p) => {
                    prop_assert!(safe, "{name:?} accepted");
                    let rest = p.strip_prefix(root).unwrap();
                    prop_assert_eq!(rest.components().count(), parts.len());
                    prop_assert!(rest.components().all(|c| matches!(c, Component::Normal(_))));
                }
                Err(_) => prop_assert!(!safe, "{name:?} refused"),
            }
        }
    }
}
