//! Talking to a VM's QEMU over QMP (the `qapi` crate's typed commands). One short connection
//! per request: QEMU serves a single QMP client at a time, so holding connections open would
//! lock out the next agent after a restart; a connection per request leaves nothing to leak.
//! Callers hold the VM's operation lock, so this runtime never queues two clients on one socket.

use std::io;
use std::path::Path;
use std::time::Duration;

use qapi::futures::QmpStreamTokio;
use qapi::qmp;
use qapi::ExecuteError;

/// Connect, greeting, capability negotiation and the command together.
pub(crate) const QMP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    #[error("QMP at {socket}: no answer to {command} within {QMP_TIMEOUT:?}")]
    Timeout {
        socket: String,
        command: &'static str,
    },
    #[error("QMP at {socket}: {command} failed: {source}")]
    Io {
        socket: String,
        command: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("QMP at {socket}: QEMU refused {command}: {message}")]
    Refused {
        socket: String,
        command: &'static str,
        message: String,
    },
}

async fn execute<C>(socket: &Path, command: C) -> Result<C::Ok, QmpError>
where
    C: qmp::QmpCommand,
{
    let name = C::NAME;
    let socket_name = socket.display().to_string();
    let exchange = async {
        let negotiation = QmpStreamTokio::open_uds(socket).await?;
        let mut stream = negotiation.negotiate().await?;
        stream.execute(command).await
    };
    match tokio::time::timeout(QMP_TIMEOUT, exchange).await {
        Err(_) => Err(QmpError::Timeout {
            socket: socket_name,
            command: name,
        }),
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(ExecuteError::Io(source))) => Err(QmpError::Io {
            socket: socket_name,
            command: name,
            source,
        }),
        Ok(Err(ExecuteError::Qapi(e))) => Err(QmpError::Refused {
            socket: socket_name,
            command: name,
            message: e.to_string(),
        }),
    }
}

pub(crate) async fn query_status(socket: &Path) -> Result<qmp::StatusInfo, QmpError> {
    execute(socket, qmp::query_status {}).await
}

/// Presses the virtual power button (ACPI); the guest decides whether to shut down.
pub(crate) async fn system_powerdown(socket: &Path) -> Result<(), QmpError> {
    execute(socket, qmp::system_powerdown {}).await.map(drop)
}

/// Ends QEMU at once. QEMU may close the socket before its answer arrives; that is success.
pub(crate) async fn quit(socket: &Path) -> Result<(), QmpError> {
    match execute(socket, qmp::quit {}).await {
        Ok(_) => Ok(()),
        Err(QmpError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(e),
    }
}
