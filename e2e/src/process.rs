//! A real `drover-hub` process for tests and benchmarks: started on ephemeral loopback ports,
//! its addresses read from what it prints, killed when dropped.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::testbed::binary;

/// A running hub process, killed when dropped.
pub struct HubProcess {
    pub child: Child,
    pub base: String,
    /// The agent endpoint, https://ADDR.
    pub agents: String,
}

impl HubProcess {
    pub async fn start(data_dir: &Path, database_url: Option<&str>) -> HubProcess {
        Self::start_with_agent_port(data_dir, database_url, 0).await
    }

    pub async fn start_with_agent_port(
        data_dir: &Path,
        database_url: Option<&str>,
        agent_port: u16,
    ) -> HubProcess {
        let mut cmd = Command::new(binary("drover-hub").unwrap());
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--agent-listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = database_url {
            cmd.env("DATABASE_URL", url);
        }
        let mut child = cmd.spawn().expect("start drover-hub");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("drover-hub announces its address within 60 s")
            .unwrap()
            .expect("drover-hub printed a line");
        let base = first
            .strip_prefix("drover-hub listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_owned();
        let mut agents = String::new();
        for _ in 0..5 {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .expect("drover-hub prints its endpoints")
                .unwrap()
                .unwrap_or_default();
            if let Some(rest) = line.trim().strip_prefix("agents:") {
                agents = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                break;
            }
        }
        assert!(
            agents.starts_with("https://"),
            "the hub announces its agent endpoint"
        );
        // Keep draining stdout so the hub never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        HubProcess {
            child,
            base,
            agents,
        }
    }

    /// A join token for `cluster`, through the GraphQL mutation an operator would use.
    pub async fn create_join_token(
        &self,
        http: &reqwest::Client,
        cluster: &str,
    ) -> anyhow::Result<String> {
        let query = format!(r#"mutation {{ createJoinToken(cluster: "{cluster}") {{ token }} }}"#);
        let resp = crate::testbed::post_gql(http, &self.url("/graphql"), &query).await?;
        resp["data"]["createJoinToken"]["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("createJoinToken failed: {resp}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}
