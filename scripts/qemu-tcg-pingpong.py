#!/usr/bin/env python3
"""Moves one test guest between fresh QEMU processes, QEMU to QEMU over loopback TCP, with the
agent's migration settings (return path, pause before switchover, 150 ms downtime limit) and
no Drover code in the path; reports every hop after which the guest crashed, booted again or
stopped counting. It tells a fault of QEMU itself from one of Drover's: run it beside a failing
guest test. Not part of the suite.

    python3 scripts/qemu-tcg-pingpong.py [HOPS] [WORKER]     (defaults 200 and 1)

Needs the test guest (`bash scripts/build-guest.sh target/guest`). Each worker uses
/tmp/qemu-pingpong-<WORKER> and loopback ports 21000 + 10 x WORKER; run several workers for more
hops per minute. A crashed hop's console is kept in that directory as crash-<hop>.log.
"""
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "target", "guest")
HOPS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
WORKER = int(sys.argv[2]) if len(sys.argv) > 2 else 1
BASE = f"/tmp/qemu-pingpong-{WORKER}"
CMDLINE = "console=ttyS0 quiet panic=-1 drover.dirty_mib_per_s=1 drover.dirty_buffer_mib=8"


def qmp(path):
    """A QMP connection (waits up to 20 s for the socket); returns a function that runs one command."""
    deadline = time.time() + 20
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    s.settimeout(60)
    f = s.makefile("rw")
    f.readline()

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                return reply

    cmd("qmp_capabilities")
    return cmd


def start(tag, incoming):
    d = os.path.join(BASE, tag)
    os.makedirs(d, exist_ok=True)
    for name in ("serial.log", "qmp.sock"):
        try:
            os.remove(os.path.join(d, name))
        except FileNotFoundError:
            pass
    args = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "128",
        "-smp", "1", "-display", "none", "-nodefaults", "-no-user-config",
        "-qmp", f"unix:{d}/qmp.sock,server=on,wait=off",
        "-chardev", f"file,id=s0,path={d}/serial.log", "-serial", "chardev:s0",
        "-kernel", f"{GUEST}/vmlinuz", "-initrd", f"{GUEST}/initramfs.gz", "-append", CMDLINE,
    ]
    if incoming:
        args += ["-incoming", "defer"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, qmp(f"{d}/qmp.sock"), d


def console(d):
    try:
        with open(os.path.join(d, "serial.log"), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def boot():
    process, q, d = start("a", False)
    deadline = time.time() + 180
    while console(d).count("drover-counter") < 10 and time.time() < deadline:
        time.sleep(0.2)
    return process, q, d


def main():
    os.makedirs(BASE, exist_ok=True)
    src, sq, sd = boot()
    crashes = 0
    for hop in range(HOPS):
        dst, dq, dd = start("b" if hop % 2 == 0 else "a", True)
        port = 21000 + WORKER * 10 + hop % 2
        dq("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        dq("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        sq("migrate-set-capabilities", capabilities=[
            {"capability": "return-path", "state": True},
            {"capability": "pause-before-switchover", "state": True},
        ])
        sq("migrate-set-parameters", **{"downtime-limit": 150})
        sq("migrate", uri=f"tcp:127.0.0.1:{port}")
        status, deadline = "", time.time() + 300
        while time.time() < deadline:
            status = sq("query-migrate")["return"].get("status", "")
            if status == "pre-switchover":
                sq("migrate-continue", state="pre-switchover")
            if status in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        src.kill()
        src.wait()
        deadline = time.time() + 20
        while console(dd).count("drover-counter") < 5 and time.time() < deadline:
            time.sleep(0.2)
        text = console(dd)
        crashed = (
            status != "completed"
            or any(s in text for s in ("Kernel panic", "Oops", "drover-guest: up"))
            or text.count("drover-counter") < 5
        )
        print(f"hop {hop}: migration {status}, {'CRASH' if crashed else 'ok'}", flush=True)
        if crashed:
            crashes += 1
            with open(os.path.join(BASE, f"crash-{hop}.log"), "w") as f:
                f.write(text)
            dst.kill()
            dst.wait()
            src, sq, sd = boot()
        else:
            src, sq, sd = dst, dq, dd
    src.kill()
    src.wait()
    print(f"{crashes} crashed guests in {HOPS} hops", flush=True)


if __name__ == "__main__":
    main()
