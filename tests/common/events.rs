//! Server-Sent Event streams as a browser's EventSource reads them: a session's audit
//! events for an administrator, a console page's presence stream.

use super::Vizor;
use std::time::{Duration, Instant};

/// A session's live event stream, read as a browser's EventSource would, by a task
/// that notes when each event arrived.
pub struct Events {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, serde_json::Value, Instant)>,
}

/// The next event block in `buf` (`None` until a whole one is there), drained.
pub fn next_event(buf: &mut Vec<u8>) -> Option<(String, serde_json::Value)> {
    let text = String::from_utf8_lossy(buf).into_owned();
    let start = text.find("event: ")?;
    let end = text[start..].find("\n\n")?;
    let block = &text[start..start + end];
    let mut lines = block.lines();
    let event = lines.next()?["event: ".len()..].to_owned();
    let data = lines
        .next()
        .and_then(|l| l.strip_prefix("data: "))
        .unwrap_or("null");
    let value = serde_json::from_str(data).unwrap();
    let consumed = text[..start + end + 2].len();
    buf.drain(..consumed);
    Some((event, value))
}

impl Events {
    pub async fn open(v: &Vizor, id: u64) -> Events {
        let auth = format!("Bearer {}", super::ADMIN_KEY);
        let mut e = Events::connect(
            v,
            &format!("/api/v1/sessions/{id}/events"),
            &[("Authorization", &auth)],
        )
        .await;
        let (event, data) = e.next().await.unwrap();
        assert_eq!(
            (event.as_str(), data["session"].as_u64()),
            ("open", Some(id))
        );
        e
    }

    /// A console page's presence stream, for the connection `token` holds.
    pub async fn presence(v: &Vizor, token: &str) -> Events {
        Events::connect(v, &format!("/console/events?token={token}"), &[]).await
    }

    pub async fn connect(v: &Vizor, path: &str, headers: &[(&str, &str)]) -> Events {
        let s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
        Events::connect_over(s, v, path, headers).await
    }

    /// As [`Events::connect`], over `s` (such as a connection from another address).
    pub async fn connect_over(
        mut s: tokio::net::TcpStream,
        v: &Vizor,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Events {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n",
            v.addr
        );
        for (k, val) in headers {
            req.push_str(&format!("{k}: {val}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        while !super::holds(&buf, b"\r\n\r\n") {
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "the event stream closed before its head");
            buf.extend_from_slice(&tmp[..n]);
        }
        let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&buf[..at]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/event-stream"), "{head}");
        let mut buf = buf[at + 4..].to_vec();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                while let Some((event, data)) = next_event(&mut buf) {
                    if tx.send((event, data, Instant::now())).is_err() {
                        return;
                    }
                }
                let mut tmp = [0u8; 4096];
                match s.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
        });
        Events { rx }
    }

    /// The next event; `None` once the stream closed.
    pub async fn next(&mut self) -> Option<(String, serde_json::Value)> {
        self.rx.recv().await.map(|(e, d, _)| (e, d))
    }

    /// Reads events until `want` matches one; returns it and when it arrived.
    pub async fn until(
        &mut self,
        want: impl Fn(&str, &serde_json::Value) -> bool,
    ) -> (serde_json::Value, Instant) {
        let deadline = Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            loop {
                let (event, data, at) = self.rx.recv().await.expect("the stream went on");
                if want(&event, &data) {
                    return (data, at);
                }
            }
        })
        .await
        .expect("the event came")
    }
}
