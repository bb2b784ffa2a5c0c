//! The demo/test guest (scripts/build-guest.sh, Debian packages only) boots under TCG in
//! seconds, counts on its serial console without gaps, dirties memory when asked, and writes
//! numbered records to its disk: the continuity checks migration tests rely on.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_guest_boots_counts_dirties_memory_and_writes_its_disk() {
    let guest = drover_e2e::testbed::test_guest();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img (package qemu-utils)");
    assert!(created.success());
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.gz"))
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 drover.disk_writes=1 drover.dirty_mib_per_s=4 drover.dirty_buffer_mib=16",
        ])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 (package qemu-system-x86)");
    let mut lines = BufReader::new(qemu.stdout.take().unwrap()).lines();
    let mut banner = None;
    let mut counters = Vec::new();
    // "Boots in seconds" on an idle machine; a loaded CI machine gets several minutes.
    let read = tokio::time::timeout(Duration::from_secs(300), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(at) = line.find("drover-guest: up") {
                banner = Some(line[at..].to_owned());
            }
            if let Some(n) = line.trim().strip_prefix("drover-counter ") {
                counters.push(n.trim().parse::<u64>().unwrap());
                if counters.len() >= 30 {
                    break;
                }
            }
        }
    })
    .await;
    qemu.kill().await.unwrap();
    assert!(
        read.is_ok(),
        "the guest printed {} counters in 300 s",
        counters.len()
    );
    let banner = banner.expect("the guest announces itself");
    assert!(banner.contains("dirty 4 MiB/s"), "{banner}");
    assert!(
        banner.contains("/dev/vda"),
        "the guest sees its virtio disk: {banner}"
    );
    let expected: Vec<u64> = (0..counters.len() as u64).collect();
    assert_eq!(counters, expected, "the counter counts without gaps");

    // Every tick's record is on the disk, in its block.
    let raw = dir.path().join("disk.raw");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&disk)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(converted.success());
    let bytes = std::fs::read(&raw).unwrap();
    for n in 0..20usize {
        let block = &bytes[n * 512..n * 512 + 22];
        assert_eq!(
            std::str::from_utf8(block).unwrap(),
            format!("drover-seq {n:010}\n"),
            "record {n} on the disk"
        );
    }
}
