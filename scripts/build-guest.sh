#!/usr/bin/env bash
# Builds Drover's demo/test guest from Debian packages only: the Debian cloud kernel and a
# busybox-static initramfs whose /init prints a counter on the serial console, and can dirty
# memory at a chosen rate and write numbered records to its disk (for migration tests).
#   scripts/build-guest.sh [OUT_DIR]     (default: target/guest) -> vmlinuz, initramfs.gz
# Kernel command-line knobs read by /init:
#   drover.counter_ms=N        counter period in ms (default 100)
#   drover.dirty_mib_per_s=N   rewrite N MiB/s of a memory buffer (default 0: off)
#   drover.dirty_buffer_mib=N  size of that buffer (default 64)
#   drover.dirty_fill=random   fill the whole buffer with non-zero bytes at boot, then print
#                              "drover-guest: buffer filled" (default: zeros, which QEMU skips)
#   drover.disk_writes=1       write "drover-seq N" into 512-byte block N of /dev/vda each tick
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ] && [ "$out/initramfs.gz" -nt scripts/build-guest.sh ]; then
  echo "guest already built in $out"
  exit 0
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Package lists may be missing on a fresh machine.
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$kernel_pkg" ]; then
  as_root apt-get update -qq
  kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$kernel_pkg" ] || { echo "cannot find the Debian cloud kernel package (linux-image-cloud-amd64)" >&2; exit 1; }
# apt's sandbox user cannot write into a root-owned temp dir; let it.
chmod 0777 "$work"
apt-get download -qq "$kernel_pkg" busybox-static 2>/dev/null || apt-get download "$kernel_pkg" busybox-static
dpkg-deb -x "$(ls linux-image-*.deb)" kernel
dpkg-deb -x "$(ls busybox-static_*.deb)" busybox
kver=$(ls kernel/lib/modules)
cp kernel/boot/vmlinuz-"$kver" "$out/vmlinuz.tmp"

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,dirty,lib/modules}
cp busybox/bin/busybox "$root/bin/busybox"
# virtio for disks and NICs; /init loads them in dependency order (virtio_ring first).
for m in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
         drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci_modern_dev.ko \
         drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko \
         net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko; do
  src=kernel/lib/modules/$kver/kernel/$m
  if [ -f "$src" ]; then cp "$src" "$root/lib/modules/"; fi
done

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=90% tmpfs /dirty
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net; do
  if [ -f /lib/modules/$m.ko ] && ! insmod /lib/modules/$m.ko 2>/tmp/insmod.err; then
    echo "drover-guest: loading $m failed: $(cat /tmp/insmod.err)"
  fi
done
arg() { for kv in $(cat /proc/cmdline); do case "$kv" in "$1="*) echo "${kv#*=}"; return;; esac; done; echo "$2"; }
period_ms=$(arg drover.counter_ms 100)
dirty=$(arg drover.dirty_mib_per_s 0)
buffer=$(arg drover.dirty_buffer_mib 64)
fill=$(arg drover.dirty_fill zero)
disk=$(arg drover.disk_writes 0)
echo "drover-guest: up (kernel $(uname -r), counter every ${period_ms} ms, dirty ${dirty} MiB/s, disk writes ${disk}, disks: $(ls /dev/vd* 2>/dev/null | tr '\n' ' '))"
if [ "$dirty" -gt 0 ]; then
  # The buffer lives in RAM: leave the kernel and the counter room, or the guest kills its own
  # init when memory runs out (and panics, and reboots).
  avail=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
  if [ "$buffer" -gt $((avail - 40)) ]; then
    buffer=$((avail - 40))
    [ "$buffer" -lt 1 ] && buffer=1
    echo "drover-guest: dirty buffer cut to ${buffer} MiB (${avail} MiB available)"
  fi
  [ "$dirty" -gt "$buffer" ] && dirty=$buffer
  (
    if [ "$fill" = random ]; then
      # One MiB of random bytes repeated: no page is zero, and copying is fast under TCG.
      dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null
      n=0
      while [ "$n" -lt "$buffer" ]; do cat /tmp/chunk; n=$((n + 1)); done > /dirty/buf
      echo "drover-guest: buffer filled (${buffer} MiB of non-zero bytes)"
    else
      dd if=/dev/zero of=/dirty/buf bs=1M count="$buffer" 2>/dev/null
    fi
    pos=0
    while true; do
      # Random bytes so that no page is zero (QEMU skips zero pages).
      dd if=/dev/urandom of=/dirty/buf bs=1M count="$dirty" seek="$pos" conv=notrunc 2>/dev/null
      pos=$(( (pos + dirty) % buffer ))
      sleep 1
    done
  ) &
fi
i=0
while true; do
  if [ "$disk" = 1 ] && [ -b /dev/vda ]; then
    printf 'drover-seq %010d\n' "$i" | dd of=/dev/vda bs=512 seek="$i" conv=notrunc,fsync 2>/dev/null
  fi
  echo "drover-counter $i"
  i=$((i + 1))
  usleep $((period_ms * 1000))
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/initramfs.gz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
echo "guest built in $out: vmlinuz ($kver), initramfs.gz"
