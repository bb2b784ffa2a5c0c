//! The unix sockets between a QEMU and its own agent: with as much in flight as a loopback TCP
//! connection gets, so that the hop into the agent's tunnel does not throttle a migration.
//!
//! A unix stream socket lets a writer have only its send buffer in flight
//! (`net.core.wmem_default`, 208 KiB on Debian), where loopback TCP grows to 4 MiB
//! (`net.ipv4.tcp_wmem`). With the default, QEMU's migration thread and the agent take turns
//! waking each other every few hundred KiB, and a migration through the tunnel ran at half the
//! speed of a direct one on the same machine. Both ends of every QEMU <-> agent socket get
//! `SEND_BUFFER` instead: the agent's end directly, QEMU's end because the agent connects it and
//! hands QEMU the connected descriptor (QMP `getfd`) rather than letting QEMU connect itself.

use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::socket::{setsockopt, sockopt};

/// What each end may have in flight: the kernel doubles the value asked for (for its own
/// bookkeeping), so this gives the 4 MiB loopback TCP grows to.
pub const SEND_BUFFER: usize = 2 << 20;

/// Widens the send buffer of `socket`: above `net.core.wmem_max` when the agent may
/// (CAP_NET_ADMIN, as a virtualization handler has), else as far as that limit lets it.
pub fn widen(socket: &impl AsFd) {
    if setsockopt(socket, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
        if let Err(e) = setsockopt(socket, sockopt::SndBuf, &SEND_BUFFER) {
            tracing::debug!(error = %e, "cannot widen a local socket's send buffer");
        }
    }
}

/// Connects to the unix socket at `path`, widened.
pub async fn connect(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    widen(&stream);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// Bytes a writer gets into `socket` before it would block, with nobody reading.
    fn in_flight(socket: &mut UnixStream) -> usize {
        socket.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let mut total = 0;
        loop {
            match socket.write(&chunk) {
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return total,
                Err(e) => panic!("writing into a local socket: {e}"),
            }
        }
    }

    #[test]
    fn a_widened_socket_holds_megabytes_in_flight_where_a_default_one_holds_kilobytes() {
        let (mut plain, _plain_reader) = UnixStream::pair().unwrap();
        let (mut wide, _wide_reader) = UnixStream::pair().unwrap();
        widen(&wide);
        let (plain, wide) = (in_flight(&mut plain), in_flight(&mut wide));
        // As root (CI, and the agent beside QEMU) the widening is not capped by wmem_max.
        assert!(
            wide >= 3 << 20,
            "a widened socket took only {wide} bytes before blocking (a default one {plain})"
        );
        assert!(wide >= 8 * plain, "widened {wide} bytes, default {plain}");
    }
}
