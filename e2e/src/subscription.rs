//! A GraphQL subscription over WebSocket (`graphql-transport-ws`) to a hub process, as a
//! portal would hold one: every event it delivers is kept for the test to read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

/// A subscription's events so far; the socket closes when this is dropped.
pub struct Subscription {
    events: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// Subscribes to `query` on the hub at `base` (http://ADDR); returns once the hub has
    /// acknowledged the connection and answered a ping after the subscribe.
    pub async fn start(base: &str, token: &str, query: &str) -> anyhow::Result<Self> {
        let url = format!("{}/graphql/ws", base.replacen("http://", "ws://", 1));
        let mut req = url.as_str().into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws"
                .parse()
                .expect("a valid header value"),
        );
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(30),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .context("connecting the subscription timed out")??;
        let send = |v: Value| Message::Text(v.to_string().into());
        ws.send(send(json!({
            "type": "connection_init",
            "payload": {"authorization": format!("Bearer {token}")}
        })))
        .await?;
        ws.send(send(
            json!({"id": "1", "type": "subscribe", "payload": {"query": query}}),
        ))
        .await?;
        ws.send(send(json!({"type": "ping"}))).await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut acked = false;
        // Up to the pong: the hub took the subscribe (it handles a connection's messages in
        // order) before it answers the ping.
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .context("the hub did not answer the subscription within 30 s")?
                .context("the hub closed the subscription")??;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text)?;
            match v["type"].as_str() {
                Some("connection_ack") => acked = true,
                Some("pong") if acked => break,
                Some("next") => events.lock().unwrap().push(v["payload"]["data"].clone()),
                Some("error") => bail!("the subscription was refused: {v}"),
                _ => {}
            }
        }
        let kept = events.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(text) = msg {
                    if let Ok(v) = serde_json::from_str::<Value>(&text) {
                        if v["type"] == "next" {
                            kept.lock().unwrap().push(v["payload"]["data"].clone());
                        }
                    }
                }
            }
        });
        Ok(Self { events, task })
    }

    /// Every event delivered so far (the subscription's `data`).
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}
