//! Captured logs for tests that check what the hub tells its operator: one process-wide
//! subscriber (installed once, WARN and above) writing into memory, searchable by substring.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static INSTALLED: OnceLock<()> = OnceLock::new();

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        BUFFER
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing (idempotent). Call before the code whose logs a test checks runs.
pub fn capture() {
    INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| Capture)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// The captured lines that contain every one of `needles`.
pub fn lines_with(needles: &[&str]) -> Vec<String> {
    let buffer = BUFFER.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&buffer)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Waits (at most 60 s: the line is logged by a task that a loaded machine may run late) for a
/// captured line containing every one of `needles`, and returns it; fails the test with
/// everything captured when there is none.
pub async fn expect_line(needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(line) = lines_with(needles).into_iter().next() {
            return line;
        }
        if tokio::time::Instant::now() >= deadline {
            let all = lines_with(&[]).join("\n");
            panic!("no log line with {needles:?}; captured:\n{all}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
