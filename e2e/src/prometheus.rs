//! A real Prometheus server for tests (Debian's `prometheus` package): scrapes the hub's
//! `/metrics` every two seconds on loopback, its targets in a file the test rewrites when a hub
//! restarts on another port (file-based discovery), its data in a temporary directory; queried
//! through its HTTP API. The process ends when the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    http: reqwest::Client,
}

fn targets_file(dir: &Path) -> PathBuf {
    dir.join("targets.json")
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port` of a hub) every two seconds.
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("prometheus is not installed; scripts/test.sh installs Debian's package")?;
        let dir = tempfile::tempdir()?;
        let config = format!(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\nscrape_configs:\n  - job_name: drover-hub\n    metrics_path: /metrics\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
            targets_file(dir.path()).display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut prometheus = Self {
            child: Command::new(binary)
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("start prometheus")?,
            dir,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        prometheus.scrape(&[target])?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ready = prometheus
                .http
                .get(format!("{}/-/ready", prometheus.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(prometheus);
            }
            if let Some(status) = prometheus.child.try_wait()? {
                bail!("prometheus exited at start-up ({status})");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("prometheus was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Scrapes `targets` (`host:port` each) from now on instead of the previous ones.
    pub fn scrape(&mut self, targets: &[&str]) -> anyhow::Result<()> {
        let file = targets_file(self.dir.path());
        let next = file.with_extension("json.new");
        std::fs::write(&next, json!([{"targets": targets}]).to_string())?;
        // Renamed into place: Prometheus never reads a half-written file.
        std::fs::rename(next, file)?;
        Ok(())
    }

    /// The result vector of an instant query (empty when no series matches).
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let body: Value = self
            .http
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", promql)])
            .send()
            .await?
            .json()
            .await?;
        if body["status"] != "success" {
            bail!("query {promql:?} failed: {body}");
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits up to `timeout` until every query returns a series; the ones that never did.
    pub async fn wait_for(&self, queries: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut missing = Vec::new();
            for promql in queries {
                if self.query(promql).await.map_or(true, |r| r.is_empty()) {
                    missing.push((*promql).to_owned());
                }
            }
            if missing.is_empty() || tokio::time::Instant::now() > deadline {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// What Prometheus says of its targets (for a failing test's message).
    pub async fn targets(&self) -> String {
        match self
            .http
            .get(format!("{}/api/v1/targets", self.base))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("targets unavailable: {e}"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
