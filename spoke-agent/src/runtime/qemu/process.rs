//! QEMU processes and qcow2 disks: the command line a VM runs with, starting QEMU so that it
//! outlives the agent (`-daemonize`), recognising a VM's live process from its pidfile, ending
//! it, and creating disks with `qemu-img`.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use drover_shared::commands::VmSpec;
use tokio::time::Instant;

use super::host::ResolvedAccel;
use super::layout::VmDir;

/// How long the daemonizing QEMU parent may take to report that the VM is up.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// `qemu-img create` of a blank image is quick; copying an image may take long.
const DISK_CREATE_TIMEOUT: Duration = Duration::from_secs(60);
const DISK_COPY_TIMEOUT: Duration = Duration::from_secs(3600);
const EXIT_POLL: Duration = Duration::from_millis(50);
/// QEMU's block node names are at most 31 characters; ours are "disk-<name>".
pub(crate) const MAX_DISK_NAME_LEN: usize = 31 - "disk-".len();

/// QEMU's option syntax separates `key=value` pairs with commas; a literal comma is doubled.
fn escape_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_value(path: &Path) -> String {
    escape_option_value(&path.to_string_lossy())
}

/// The whole QEMU command line of a VM, without the binary.
///
/// - Disks are `-blockdev` qcow2 nodes named `disk-<name>` on `virtio-blk-pci` devices with the
///   id `disk-<name>`: stable names a block mirror (live migration) can target.
/// - Every network maps to QEMU user networking (`-netdev user`) for now: the guest gets NAT'd
///   outbound access and nothing else; bridges and tap devices come with real networks.
/// - Without direct kernel boot the first disk is the boot disk.
/// - `q35` is the machine type KubeVirt uses too; a migration receiver must run the same machine
///   type and devices, which this function gives for the same spec. Memory is rounded up to MiB.
/// - Serial output is appended to `serial.log`, so a restarted VM's console history stays.
pub(crate) fn qemu_args(dir: &VmDir, spec: &VmSpec, accel: ResolvedAccel) -> Vec<OsString> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));
    let memory_mib = spec.memory_bytes.div_ceil(1 << 20).max(1);
    push(&[
        "-name",
        &format!("guest={}/{},debug-threads=on", spec.namespace, spec.name),
        "-machine",
        "q35",
        "-accel",
        accel.as_qemu_arg(),
        "-cpu",
        accel.cpu_model(),
        "-m",
        &memory_mib.to_string(),
        "-smp",
        &spec.vcpus.to_string(),
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-daemonize",
        "-pidfile",
        &dir.pidfile().to_string_lossy(),
        "-qmp",
        &format!("unix:{},server=on,wait=off", path_value(&dir.qmp_socket())),
        "-chardev",
        &format!(
            "file,id=serial0,path={},append=on",
            path_value(&dir.serial_log())
        ),
        "-serial",
        "chardev:serial0",
    ]);
    for (index, disk) in spec.disks.iter().enumerate() {
        let node = format!("disk-{}", disk.name);
        let mut device = format!("virtio-blk-pci,drive={node},id={node}");
        if index == 0 && spec.boot.is_none() {
            device.push_str(",bootindex=0");
        }
        push(&[
            "-blockdev",
            &format!(
                "driver=qcow2,node-name={node},file.driver=file,file.filename={}",
                path_value(&dir.disk(&disk.name))
            ),
            "-device",
            &device,
        ]);
    }
    for interface in &spec.interfaces {
        let netdev = format!("net-{}", interface.name);
        push(&[
            "-netdev",
            &format!("user,id={netdev}"),
            "-device",
            &format!(
                "virtio-net-pci,netdev={netdev},mac={},id=nic-{}",
                interface.mac, interface.name
            ),
        ]);
    }
    if let Some(boot) = &spec.boot {
        push(&["-kernel", &boot.kernel]);
        if let Some(initrd) = &boot.initrd {
            push(&["-initrd", initrd]);
        }
        if !boot.cmdline.is_empty() {
            push(&["-append", &boot.cmdline]);
        }
    }
    args.into_iter().map(OsString::from).collect()
}

/// Starts a VM's QEMU and returns its pid. QEMU daemonizes: the process we spawn forks the
/// real VM into its own session (so it survives the agent and its process group) and exits
/// once the VM is set up, having written the pidfile and opened the QMP socket.
pub(crate) async fn launch(
    qemu_binary: &Path,
    dir: &VmDir,
    spec: &VmSpec,
    accel: ResolvedAccel,
) -> Result<u32, String> {
    launch_with(qemu_binary, dir, spec, accel, &[]).await
}

/// `launch` with `extra` arguments after the VM's own (a migration receiver adds
/// `-incoming defer -S`).
pub(crate) async fn launch_with(
    qemu_binary: &Path,
    dir: &VmDir,
    spec: &VmSpec,
    accel: ResolvedAccel,
    extra: &[&str],
) -> Result<u32, String> {
    for stale in [dir.pidfile(), dir.qmp_socket()] {
        match std::fs::remove_file(&stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove stale {}: {e}", stale.display())),
        }
    }
    // After daemonizing QEMU prints nowhere; what it says while starting lands in qemu.log.
    let log = std::fs::File::create(dir.qemu_log())
        .map_err(|e| format!("cannot create {}: {e}", dir.qemu_log().display()))?;
    let mut parent = tokio::process::Command::new(qemu_binary)
        .args(qemu_args(dir, spec, accel))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // If we give up on a hung parent, killing it makes the half-started VM exit too.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run {}: {e}; install QEMU (Debian: qemu-system-x86) or configure its path",
                qemu_binary.display()
            )
        })?;
    let status = match tokio::time::timeout(LAUNCH_TIMEOUT, parent.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("waiting for QEMU failed: {e}")),
        Err(_) => {
            let _ = parent.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), parent.wait()).await;
            return Err(format!(
                "QEMU did not finish starting within {LAUNCH_TIMEOUT:?}; it was stopped. {}",
                qemu_log_excerpt(dir)
            ));
        }
    };
    if !status.success() {
        return Err(format!(
            "QEMU exited with {status}: {}",
            qemu_log_excerpt(dir)
        ));
    }
    running_pid(dir).ok_or_else(|| {
        format!(
            "QEMU reported success but no live process is recorded in {}: {}",
            dir.pidfile().display(),
            qemu_log_excerpt(dir)
        )
    })
}

fn qemu_log_excerpt(dir: &VmDir) -> String {
    let text = std::fs::read_to_string(dir.qemu_log()).unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        return "(QEMU printed nothing)".into();
    }
    // The end says what went wrong; keep messages short enough for a command outcome.
    let chars: Vec<char> = text.chars().collect();
    let start = chars.len().saturating_sub(2000);
    chars[start..].iter().collect()
}

/// The pid of the VM's QEMU if it runs: the pidfile names a live process whose command line
/// carries this VM's pidfile path (so a recycled pid of some other process does not count).
pub(crate) fn running_pid(dir: &VmDir) -> Option<u32> {
    let text = std::fs::read_to_string(dir.pidfile()).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    is_qemu_of(pid, dir).then_some(pid)
}

/// Whether `pid` is this VM's QEMU. A zombie has an empty command line, so it does not count.
pub(crate) fn is_qemu_of(pid: u32, dir: &VmDir) -> bool {
    if pid <= 1 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let pidfile = dir.pidfile();
    let pidfile = pidfile.to_string_lossy();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == pidfile.as_bytes())
}

/// SIGKILL, after checking once more that `pid` still is this VM's QEMU.
pub(crate) fn kill(pid: u32, dir: &VmDir) -> Result<(), String> {
    if !is_qemu_of(pid, dir) {
        return Ok(());
    }
    let raw = i32::try_from(pid).map_err(|_| format!("pid {pid} is out of range"))?;
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(format!("cannot kill pid {pid}: {e}")),
    }
}

/// Waits until `pid` is no longer this VM's QEMU, at most `timeout`; true if it is gone.
pub(crate) async fn wait_for_exit(pid: u32, dir: &VmDir, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_qemu_of(pid, dir) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(EXIT_POLL.min(deadline - Instant::now())).await;
    }
}

/// Creates the disks that do not exist yet; existing disk files are never touched. A disk is
/// built under a temporary name and renamed when complete, so a failed copy leaves no disk.
/// The error names the disk and says what went wrong.
pub(crate) async fn prepare_disks(
    qemu_img: &Path,
    dir: &VmDir,
    spec: &VmSpec,
) -> Result<(), (String, String)> {
    for disk in &spec.disks {
        let target = dir.disk(&disk.name);
        if target.exists() {
            continue;
        }
        let tmp = dir.path.join(format!(".disk-{}.qcow2.tmp", disk.name));
        let _ = std::fs::remove_file(&tmp);
        // qcow2 sizes are whole 512-byte sectors.
        let size = disk.size_bytes.div_ceil(512) * 512;
        let built = match &disk.image {
            None => {
                run_qemu_img(
                    qemu_img,
                    &[
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        tmp.clone().into(),
                        size.to_string().into(),
                    ],
                    DISK_CREATE_TIMEOUT,
                )
                .await
            }
            Some(image) => {
                // The image is inside an allowed directory; what it refers to must not lead
                // out of it (a backing file, an external data file), and its format is given
                // to qemu-img rather than probed.
                let inspected = qemu_img_output(
                    qemu_img,
                    &[
                        "info".into(),
                        "-U".into(),
                        "--output=json".into(),
                        image.into(),
                    ],
                    DISK_CREATE_TIMEOUT,
                )
                .await
                .and_then(|json| self_contained_format(&json, image));
                let copied = match inspected {
                    Err(e) => Err(e),
                    Ok(format) => {
                        run_qemu_img(
                            qemu_img,
                            &[
                                "convert".into(),
                                "-f".into(),
                                format.into(),
                                "-O".into(),
                                "qcow2".into(),
                                image.into(),
                                tmp.clone().into(),
                            ],
                            DISK_COPY_TIMEOUT,
                        )
                        .await
                    }
                };
                match copied {
                    Ok(()) => run_qemu_img(
                        qemu_img,
                        &[
                            "resize".into(),
                            "-q".into(),
                            "-f".into(),
                            "qcow2".into(),
                            tmp.clone().into(),
                            size.to_string().into(),
                        ],
                        DISK_CREATE_TIMEOUT,
                    )
                    .await
                    .map_err(|e| {
                        format!("growing the copy of {image} to {size} bytes failed (is the image larger than the disk?): {e}")
                    }),
                    Err(e) => Err(format!("copying image {image} failed: {e}")),
                }
            }
        };
        let renamed = built.and_then(|()| {
            std::fs::rename(&tmp, &target)
                .map_err(|e| format!("cannot rename {} into place: {e}", tmp.display()))
        });
        if let Err(detail) = renamed {
            let _ = std::fs::remove_file(&tmp);
            return Err((disk.name.clone(), detail));
        }
    }
    Ok(())
}

/// The format of an image that stands alone: raw, or qcow2 without a backing file or an
/// external data file (either could name any file on the host, which `qemu-img convert` would
/// then read). Anything else is refused with what to do.
pub(crate) fn self_contained_format(info_json: &str, image: &str) -> Result<&'static str, String> {
    let info: serde_json::Value = serde_json::from_str(info_json)
        .map_err(|e| format!("cannot read qemu-img info of {image}: {e}"))?;
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(format!(
            "image {image} has a backing file ({backing}); images must stand alone: flatten it first (qemu-img convert -O qcow2 {image} flat.qcow2)"
        ));
    }
    if let Some(data_file) = info
        .pointer("/format-specific/data/data-file")
        .and_then(|d| d.as_str())
    {
        return Err(format!(
            "image {image} keeps its data in an external file ({data_file}); images must stand alone: convert it first (qemu-img convert -O qcow2 {image} flat.qcow2)"
        ));
    }
    match info.get("format").and_then(|f| f.as_str()) {
        Some("raw") => Ok("raw"),
        Some("qcow2") => Ok("qcow2"),
        other => Err(format!(
            "image {image} is in format {}; give a raw or qcow2 image (qemu-img convert -O qcow2 {image} image.qcow2)",
            other.unwrap_or("unknown")
        )),
    }
}

/// Runs qemu-img and returns what it printed.
async fn qemu_img_output(
    qemu_img: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<String, String> {
    let run = tokio::process::Command::new(qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(timeout, run).await {
        Err(_) => return Err(format!("qemu-img did not finish within {timeout:?}")),
        Ok(Err(e)) => {
            return Err(format!(
                "cannot run {}: {e}; install qemu-img (Debian: qemu-utils) or configure its path",
                qemu_img.display()
            ))
        }
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "qemu-img exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

async fn run_qemu_img(qemu_img: &Path, args: &[OsString], timeout: Duration) -> Result<(), String> {
    qemu_img_output(qemu_img, args, timeout).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_images_that_stand_alone_are_copied() {
        let ok = |json: &str| self_contained_format(json, "/img/a");
        assert_eq!(ok(r#"{"format": "raw", "virtual-size": 1}"#), Ok("raw"));
        assert_eq!(
            ok(
                r#"{"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}"#
            ),
            Ok("qcow2")
        );
        let backed = ok(r#"{"format": "qcow2", "backing-filename": "/root/secret"}"#).unwrap_err();
        assert!(
            backed.contains("backing file (/root/secret)") && backed.contains("flatten"),
            "{backed}"
        );
        let data = ok(r#"{"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/shadow"}}}"#).unwrap_err();
        assert!(data.contains("external file (/etc/shadow)"), "{data}");
        let vmdk = ok(r#"{"format": "vmdk"}"#).unwrap_err();
        assert!(
            vmdk.contains("format vmdk") && vmdk.contains("raw or qcow2"),
            "{vmdk}"
        );
        assert!(ok("not json").is_err());
    }
    use drover_shared::commands::{BootSpec, DiskSpec};
    use drover_shared::inventory::{Interface, RunStrategy};

    fn spec() -> VmSpec {
        VmSpec {
            namespace: "default".into(),
            name: "web-1".into(),
            memory_bytes: (256 << 20) + 1,
            vcpus: 2,
            disks: vec![
                DiskSpec {
                    name: "root".into(),
                    size_bytes: 64 << 20,
                    image: None,
                },
                DiskSpec {
                    name: "data".into(),
                    size_bytes: 64 << 20,
                    image: None,
                },
            ],
            interfaces: vec![Interface {
                name: "nic0".into(),
                network: "default".into(),
                mac: "02:00:00:00:00:01".into(),
            }],
            labels: Default::default(),
            run_strategy: RunStrategy::Always,
            boot: None,
        }
    }

    fn joined(args: Vec<OsString>) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_command_line_names_disks_and_nics_stably_and_daemonizes() {
        let dir = VmDir {
            path: "/data/vms/default/web-1".into(),
        };
        let line = joined(qemu_args(&dir, &spec(), ResolvedAccel::Tcg));
        for expected in [
            "-name guest=default/web-1,debug-threads=on",
            "-accel tcg -cpu max -m 257 -smp 2",
            "-daemonize -pidfile /data/vms/default/web-1/qemu.pid",
            "-qmp unix:/data/vms/default/web-1/qmp.sock,server=on,wait=off",
            "path=/data/vms/default/web-1/serial.log,append=on",
            "-blockdev driver=qcow2,node-name=disk-root,file.driver=file,file.filename=/data/vms/default/web-1/disk-root.qcow2",
            "-device virtio-blk-pci,drive=disk-root,id=disk-root,bootindex=0",
            "-device virtio-blk-pci,drive=disk-data,id=disk-data -netdev",
            "-netdev user,id=net-nic0 -device virtio-net-pci,netdev=net-nic0,mac=02:00:00:00:00:01,id=nic-nic0",
        ] {
            assert!(line.contains(expected), "{expected:?} missing from {line}");
        }
        assert!(!line.contains("-kernel"));

        let mut direct = spec();
        direct.boot = Some(BootSpec {
            kernel: "/guest/vmlinuz".into(),
            initrd: Some("/guest/initramfs.gz".into()),
            cmdline: "console=ttyS0 quiet".into(),
        });
        let args = qemu_args(&dir, &direct, ResolvedAccel::Kvm);
        let line = joined(args.clone());
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(!line.contains("bootindex"), "{line}");
        assert!(
            line.ends_with(
                "-kernel /guest/vmlinuz -initrd /guest/initramfs.gz -append console=ttyS0 quiet"
            ),
            "{line}"
        );
        // The kernel command line stays one argument.
        assert_eq!(args.last().unwrap(), "console=ttyS0 quiet");
    }

    #[test]
    fn commas_in_paths_are_escaped_in_options() {
        let dir = VmDir {
            path: "/data,odd/vms/default/web-1".into(),
        };
        let line = joined(qemu_args(&dir, &spec(), ResolvedAccel::Tcg));
        assert!(
            line.contains("unix:/data,,odd/vms/default/web-1/qmp.sock,server=on"),
            "{line}"
        );
        // -pidfile is a plain argument, not an option list.
        assert!(
            line.contains("-pidfile /data,odd/vms/default/web-1/qemu.pid"),
            "{line}"
        );
    }
}
