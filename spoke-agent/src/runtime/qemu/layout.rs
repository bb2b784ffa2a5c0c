//! The QEMU runtime's files: `<data_dir>/vms/<namespace>/<name>/` holds one VM's declaration
//! (`vm.json`), its stable `uid`, its disks and the files of its running QEMU. This module
//! names those paths, reads and writes declarations (atomically) and scans for them.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use drover_shared::commands::VmSpec;
use drover_shared::ids::{Namespace, VmName};
use drover_shared::inventory::normalize_mac;

/// A VM's identity on this agent: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct VmKey {
    pub namespace: String,
    pub name: String,
}

impl VmKey {
    pub(crate) fn of(spec: &VmSpec) -> Self {
        Self {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
        }
    }

    /// Both parts must be DNS-1123 labels, which also keeps them from escaping the data dir.
    pub(crate) fn checked(
        namespace: &str,
        name: &str,
    ) -> Result<Self, drover_shared::ids::InvalidName> {
        Namespace::new(namespace)?;
        VmName::new(name)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for VmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The directory of one VM and the files in it.
#[derive(Debug, Clone)]
pub(crate) struct VmDir {
    pub path: PathBuf,
}

impl VmDir {
    pub(crate) fn new(vms_root: &Path, key: &VmKey) -> Self {
        Self {
            path: vms_root.join(&key.namespace).join(&key.name),
        }
    }

    pub(crate) fn spec_file(&self) -> PathBuf {
        self.path.join("vm.json")
    }
    pub(crate) fn uid_file(&self) -> PathBuf {
        self.path.join("uid")
    }
    pub(crate) fn disk(&self, disk_name: &str) -> PathBuf {
        self.path.join(format!("disk-{disk_name}.qcow2"))
    }
    pub(crate) fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }
    pub(crate) fn serial_log(&self) -> PathBuf {
        self.path.join("serial.log")
    }
    pub(crate) fn pidfile(&self) -> PathBuf {
        self.path.join("qemu.pid")
    }
    /// What QEMU printed while starting (after daemonizing it prints nowhere).
    pub(crate) fn qemu_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }
}

/// Reads a declaration. `Ok(None)`: there is none. `Err`: it is there but unusable, and why.
pub(crate) fn read_spec(dir: &VmDir, expected: &VmKey) -> Result<Option<VmSpec>, String> {
    let path = dir.spec_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let spec: VmSpec =
        serde_json::from_str(&text).map_err(|e| format!("it is not a VM spec: {e}"))?;
    if VmKey::of(&spec) != *expected {
        return Err(format!(
            "it declares {}/{} but lies in the directory of {expected}; move it to vms/{}/{}/",
            spec.namespace, spec.name, spec.namespace, spec.name
        ));
    }
    spec.validate()?;
    let mut spec = spec;
    for interface in &mut spec.interfaces {
        interface.mac = normalize_mac(&interface.mac)?;
    }
    Ok(Some(spec))
}

/// Writes `vm.json` so that a reader sees the old or the new file, never a half-written one.
pub(crate) fn write_spec(dir: &VmDir, spec: &VmSpec) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(spec).map_err(io::Error::other)?;
    json.push(b'\n');
    write_atomically(&dir.spec_file(), &json)
}

pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", uuid::Uuid::new_v4()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The VM's uid, created once. A hard link cannot replace an existing file, so two racing
/// creators agree on one uid.
pub(crate) fn ensure_uid(dir: &VmDir) -> io::Result<String> {
    let path = dir.uid_file();
    if let Some(uid) = read_uid(&path)? {
        return Ok(uid);
    }
    let tmp = dir.path.join(format!(".uid.{}.tmp", uuid::Uuid::new_v4()));
    std::fs::write(&tmp, format!("{}\n", uuid::Uuid::new_v4()))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    read_uid(&path)?.ok_or_else(|| io::Error::other(format!("{} is empty", path.display())))
}

fn read_uid(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|u| !u.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a scan of `vms/` found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub declared: BTreeMap<VmKey, VmSpec>,
    /// Declarations that cannot be used, by file, with the reason.
    pub malformed: BTreeMap<PathBuf, String>,
}

/// Every `vms/<namespace>/<name>/vm.json`. Directories without a declaration (a create in
/// progress, leftovers) are not VMs; hidden entries are temporary files. A declaration that
/// reuses a MAC address of an earlier one (in name order) is unusable: the hub refuses an
/// inventory with duplicate MACs whole.
pub(crate) fn scan(vms_root: &Path) -> io::Result<Scan> {
    let mut scan = scan_files(vms_root)?;
    let mut owners: BTreeMap<String, VmKey> = BTreeMap::new();
    let mut duplicates = Vec::new();
    for (key, spec) in &scan.declared {
        for interface in &spec.interfaces {
            match owners.get(&interface.mac) {
                Some(owner) if owner != key => {
                    duplicates.push((key.clone(), interface.mac.clone(), owner.clone()));
                }
                _ => {
                    owners.insert(interface.mac.clone(), key.clone());
                }
            }
        }
    }
    for (key, mac, owner) in duplicates {
        if scan.declared.remove(&key).is_some() {
            let file = VmDir::new(vms_root, &key).spec_file();
            scan.malformed.insert(
                file,
                format!("MAC address {mac} is already declared by virtual machine {owner}"),
            );
        }
    }
    Ok(scan)
}

fn scan_files(vms_root: &Path) -> io::Result<Scan> {
    let mut scan = Scan::default();
    for namespace in read_dir_names(vms_root)? {
        let namespace_dir = vms_root.join(&namespace);
        if !namespace_dir.is_dir() {
            continue;
        }
        for name in read_dir_names(&namespace_dir)? {
            let dir = VmDir {
                path: namespace_dir.join(&name),
            };
            let spec_file = dir.spec_file();
            if !spec_file.is_file() {
                continue;
            }
            let key = match VmKey::checked(&namespace, &name) {
                Ok(key) => key,
                Err(e) => {
                    scan.malformed
                        .insert(spec_file, format!("its directory is not a VM's: {e}"));
                    continue;
                }
            };
            match read_spec(&dir, &key) {
                Ok(Some(spec)) => {
                    scan.declared.insert(key, spec);
                }
                Ok(None) => {} // removed meanwhile
                Err(e) => {
                    scan.malformed.insert(spec_file, e);
                }
            }
        }
    }
    Ok(scan)
}

fn read_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str() {
            if !name.starts_with('.') {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::inventory::RunStrategy;

    fn spec(namespace: &str, name: &str) -> VmSpec {
        VmSpec {
            namespace: namespace.into(),
            name: name.into(),
            memory_bytes: 128 << 20,
            vcpus: 1,
            disks: vec![],
            interfaces: vec![],
            labels: Default::default(),
            run_strategy: RunStrategy::Halted,
            boot: None,
        }
    }

    #[test]
    fn scan_finds_declarations_and_names_the_broken_ones() {
        let root = tempfile::tempdir().unwrap();
        let good = VmKey::checked("default", "good").unwrap();
        let good_dir = VmDir::new(root.path(), &good);
        std::fs::create_dir_all(&good_dir.path).unwrap();
        write_spec(&good_dir, &spec("default", "good")).unwrap();

        let misplaced = VmDir::new(root.path(), &VmKey::checked("default", "here").unwrap());
        std::fs::create_dir_all(&misplaced.path).unwrap();
        write_spec(&misplaced, &spec("default", "elsewhere")).unwrap();

        let garbage = root.path().join("default/garbage");
        std::fs::create_dir_all(&garbage).unwrap();
        std::fs::write(garbage.join("vm.json"), "{nope").unwrap();

        let no_declaration = root.path().join("default/half-created");
        std::fs::create_dir_all(&no_declaration).unwrap();

        let scan = scan(root.path()).unwrap();
        assert_eq!(scan.declared.keys().collect::<Vec<_>>(), vec![&good]);
        let problems: Vec<String> = scan.malformed.values().cloned().collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("not a VM spec")));
        assert!(problems
            .iter()
            .any(|p| p.contains("declares default/elsewhere")));
        assert!(garbage.join("vm.json").exists(), "never deleted");
    }

    #[test]
    fn a_reused_mac_makes_the_later_declaration_unusable() {
        let root = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            let dir = VmDir::new(root.path(), &VmKey::checked("default", name).unwrap());
            std::fs::create_dir_all(&dir.path).unwrap();
            let mut spec = spec("default", name);
            spec.interfaces.push(drover_shared::inventory::Interface {
                name: "nic0".into(),
                network: "default".into(),
                mac: if name == "a" {
                    "02:00:00:00:00:0A"
                } else {
                    "02-00-00-00-00-0a"
                }
                .into(),
            });
            write_spec(&dir, &spec).unwrap();
        }
        let scan = scan(root.path()).unwrap();
        let declared: Vec<String> = scan.declared.keys().map(ToString::to_string).collect();
        assert_eq!(declared, vec!["default/a"]);
        assert_eq!(
            scan.declared.values().next().unwrap().interfaces[0].mac,
            "02:00:00:00:00:0a"
        );
        let problem = scan.malformed.values().next().unwrap();
        assert!(
            problem.contains("already declared by virtual machine default/a"),
            "{problem}"
        );
    }

    #[test]
    fn the_uid_is_created_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir {
            path: root.path().to_owned(),
        };
        let first = ensure_uid(&dir).unwrap();
        assert_eq!(ensure_uid(&dir).unwrap(), first);
        uuid::Uuid::parse_str(&first).unwrap();
    }
}
