//! Which host files a VM spec may name: disk images, kernels and initrds are read only from
//! the directories the agent was given (`--image-dir`), after resolving `..` and symlinks, so
//! a spec cannot make the agent copy or boot any other file of its host (its own key, say).

use std::path::{Path, PathBuf};

/// The flag (and environment variable) that names the allowed directories, for error messages.
const HOW_TO_ALLOW: &str = "pass --image-dir DIR (or DROVER_IMAGE_DIRS=DIR,...) to the agent";

/// The canonical path of `file` if it is a regular file inside one of `allowed_dirs` once both
/// are resolved (`std::fs::canonicalize`: no `..`, every symlink followed). `what` names the
/// file in the error ("kernel", "disk \"root\": image"), which also names the allowed
/// directories and what to do. Allowed directories that do not exist allow nothing.
pub(crate) fn allowed_host_file(
    what: &str,
    file: &str,
    allowed_dirs: &[PathBuf],
) -> Result<PathBuf, String> {
    let path = Path::new(file);
    // QEMU changes to / when it daemonizes; host files are named absolutely.
    if !path.is_absolute() {
        return Err(format!("{what} {file} must be an absolute path"));
    }
    if allowed_dirs.is_empty() {
        return Err(format!(
            "{what} {file} is refused: this agent reads images, kernels and initrds from no \
             directory, so its VMs may only have blank disks and no boot files; {HOW_TO_ALLOW} \
             and put the file there"
        ));
    }
    let allowed: Vec<PathBuf> = allowed_dirs
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .collect();
    let listed = describe(allowed_dirs);
    let resolved = path.canonicalize().map_err(|e| {
        format!(
            "{what} {file} is not a file on this agent's host ({e}); put it in one of the agent's \
             image directories ({listed})"
        )
    })?;
    if !allowed.iter().any(|dir| resolved.starts_with(dir)) {
        let via = if resolved == path {
            String::new()
        } else {
            format!(" (it resolves to {})", resolved.display())
        };
        return Err(format!(
            "{what} {file}{via} is outside the agent's image directories ({listed}); put the \
             file in one of them, or {HOW_TO_ALLOW} for its directory"
        ));
    }
    if !resolved.is_file() {
        return Err(format!(
            "{what} {file} is not a regular file; name an image, kernel or initrd file"
        ));
    }
    Ok(resolved)
}

/// The allowed directories as an error message lists them, marking the missing ones.
fn describe(allowed_dirs: &[PathBuf]) -> String {
    allowed_dirs
        .iter()
        .map(|dir| {
            if dir.is_dir() {
                dir.display().to_string()
            } else {
                format!("{} (does not exist)", dir.display())
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::slice;

    struct Dirs {
        _root: tempfile::TempDir,
        allowed: PathBuf,
        outside: PathBuf,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("images");
        let outside = root.path().join("private");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("sub/disk.qcow2"), b"image").unwrap();
        std::fs::write(outside.join("key.pem"), b"secret").unwrap();
        Dirs {
            _root: root,
            allowed,
            outside,
        }
    }

    fn text(path: &Path) -> String {
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn a_file_inside_an_allowed_dir_resolves_to_its_canonical_path() {
        let d = dirs();
        let file = d.allowed.join("sub/disk.qcow2");
        let resolved =
            allowed_host_file("image", &text(&file), slice::from_ref(&d.allowed)).unwrap();
        assert_eq!(resolved, file.canonicalize().unwrap());
        // Named through `..` that stays inside, and with the allowed dir itself named oddly.
        let odd_dir = d.allowed.join("sub/..");
        let via_dots = text(&d.allowed.join("sub/../sub/disk.qcow2"));
        assert_eq!(
            allowed_host_file("image", &via_dots, slice::from_ref(&odd_dir)).unwrap(),
            resolved
        );
    }

    #[test]
    fn a_file_outside_is_refused_naming_the_allowed_dirs_and_the_flag() {
        let d = dirs();
        let key = text(&d.outside.join("key.pem"));
        let err = allowed_host_file("kernel", &key, slice::from_ref(&d.allowed)).unwrap_err();
        for needle in [
            "kernel",
            key.as_str(),
            "outside",
            d.allowed.to_str().unwrap(),
            "--image-dir",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from {err}");
        }
    }

    #[test]
    fn dot_dot_out_of_an_allowed_dir_is_refused() {
        let d = dirs();
        let escape = text(&d.allowed.join("../private/key.pem"));
        let err = allowed_host_file("initrd", &escape, slice::from_ref(&d.allowed)).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        assert!(err.contains("resolves to"), "{err}");
        assert!(err.contains("private/key.pem"), "{err}");
    }

    #[test]
    fn a_symlink_inside_pointing_outside_is_refused() {
        let d = dirs();
        let link = d.allowed.join("innocent.qcow2");
        std::os::unix::fs::symlink(d.outside.join("key.pem"), &link).unwrap();
        let err =
            allowed_host_file("image", &text(&link), slice::from_ref(&d.allowed)).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        assert!(err.contains("resolves to"), "{err}");
        // A symlinked directory inside that leads out is no way around it either.
        let dir_link = d.allowed.join("elsewhere");
        std::os::unix::fs::symlink(&d.outside, &dir_link).unwrap();
        let through = text(&dir_link.join("key.pem"));
        assert!(allowed_host_file("image", &through, slice::from_ref(&d.allowed)).is_err());
        // A symlink inside pointing inside is fine.
        let good = d.allowed.join("current.qcow2");
        std::os::unix::fs::symlink(d.allowed.join("sub/disk.qcow2"), &good).unwrap();
        assert!(allowed_host_file("image", &text(&good), slice::from_ref(&d.allowed)).is_ok());
    }

    #[test]
    fn a_missing_file_is_refused_as_not_on_this_host() {
        let d = dirs();
        let missing = text(&d.allowed.join("nothing.qcow2"));
        let err = allowed_host_file("image", &missing, slice::from_ref(&d.allowed)).unwrap_err();
        assert!(err.contains("is not a file on this agent's host"), "{err}");
        assert!(err.contains(d.allowed.to_str().unwrap()), "{err}");
    }

    #[test]
    fn a_nonexistent_allowed_dir_allows_nothing_and_says_so() {
        let d = dirs();
        let gone = d.outside.join("no-such-dir");
        let key = text(&d.outside.join("key.pem"));
        let err = allowed_host_file("image", &key, slice::from_ref(&gone)).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        assert!(
            err.contains(&format!("{} (does not exist)", gone.display())),
            "{err}"
        );
    }

    #[test]
    fn without_allowed_dirs_every_file_is_refused_with_what_to_do() {
        let d = dirs();
        let file = text(&d.allowed.join("sub/disk.qcow2"));
        let err = allowed_host_file("image", &file, &[]).unwrap_err();
        assert!(err.contains(&file), "{err}");
        assert!(err.contains("--image-dir"), "{err}");
        assert!(err.contains("blank disks"), "{err}");
    }

    #[test]
    fn relative_paths_and_directories_are_refused() {
        let d = dirs();
        let err =
            allowed_host_file("kernel", "images/vmlinuz", slice::from_ref(&d.allowed)).unwrap_err();
        assert!(err.contains("must be an absolute path"), "{err}");
        let err = allowed_host_file(
            "kernel",
            &text(&d.allowed.join("sub")),
            slice::from_ref(&d.allowed),
        )
        .unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
