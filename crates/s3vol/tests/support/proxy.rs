//! A TCP proxy in front of the test S3 server, for tests that need to see or break the
//! traffic of one mount without touching the server other tests share.
//!
//! It forwards each connection to the upstream server, records the request head (request line
//! and headers) the client sent first on it, and counts the bytes in each direction. Switched
//! off, it closes every new connection at once, which the S3 client sees as a dead server.
//! Hung, it accepts new connections and reads what is sent on them but never answers, as a
//! server that stopped responding (or a network that dropped its packets) would; connections
//! hung so stay hung after it is switched back on, as they would across a partition.
//! The test server answers every request with `Connection: close`, so one connection carries
//! one request and its recorded head describes it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Default)]
struct State {
    down: AtomicBool,
    hang: AtomicBool,
    hung: AtomicU64,
    refuse_parts: AtomicBool,
    refuse_copies: AtomicBool,
    hang_heads: AtomicBool,
    refused: AtomicU64,
    /// Part uploads still to answer with an HTTP 500.
    parts_to_fail: AtomicU64,
    failed_with_500: AtomicU64,
    to_client: AtomicU64,
    heads: Mutex<Vec<String>>,
}

/// One recorded request: its request line and headers.
#[derive(Clone, Debug)]
pub struct Request {
    pub head: String,
}

impl Request {
    /// `PUT`, `GET`, …
    pub fn method(&self) -> &str {
        self.head.split(' ').next().unwrap_or("")
    }

    /// The request target (path and query).
    pub fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    /// The path of the target, without the query.
    pub fn path(&self) -> &str {
        self.target().split('?').next().unwrap_or("")
    }

    /// Whether the query has parameter `name` (`uploads`, `partNumber`, …).
    pub fn has_param(&self, name: &str) -> bool {
        self.target()
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.split('=').next() == Some(name)))
    }

    /// A part upload (UploadPart, not a server-side part copy).
    pub fn is_part_upload(&self) -> bool {
        self.method() == "PUT"
            && self.has_param("partNumber")
            && self.header("x-amz-copy-source").is_none()
    }

    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 in front of `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://IP:PORT");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if st.down.load(Ordering::SeqCst) {
                    st.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                if st.hang.load(Ordering::SeqCst) {
                    st.hung.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(swallow(client));
                    continue;
                }
                tokio::spawn(forward(client, upstream, st.clone()));
            }
        });
        Self {
            addr,
            state,
            rt: Some(rt),
        }
    }

    /// The endpoint URL to give the client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches forwarding off (every new connection is closed at once) or back on.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Makes new connections hang (read, never answered) or forwards them again.
    pub fn set_hang(&self, hang: bool) {
        self.state.hang.store(hang, Ordering::SeqCst);
    }

    /// Connections accepted while hanging.
    pub fn hung(&self) -> u64 {
        self.state.hung.load(Ordering::SeqCst)
    }

    /// Closes the connections of part uploads (UploadPart), forwarding everything else.
    pub fn set_refuse_parts(&self, refuse: bool) {
        self.state.refuse_parts.store(refuse, Ordering::SeqCst);
    }

    /// Closes the connections of server-side copies (CopyObject, UploadPartCopy), forwarding
    /// everything else.
    pub fn set_refuse_copies(&self, refuse: bool) {
        self.state.refuse_copies.store(refuse, Ordering::SeqCst);
    }

    /// Records HEAD requests and never answers them (or forwards them again), forwarding
    /// everything else.
    pub fn set_hang_heads(&self, hang: bool) {
        self.state.hang_heads.store(hang, Ordering::SeqCst);
    }

    /// Answers the next `n` part uploads with `500 InternalError` (after reading their body,
    /// as a server that failed would), forwarding everything else.
    pub fn fail_next_parts(&self, n: u64) {
        self.state.parts_to_fail.store(n, Ordering::SeqCst);
    }

    /// Part uploads answered with a 500 so far.
    pub fn failed_with_500(&self) -> u64 {
        self.state.failed_with_500.load(Ordering::SeqCst)
    }

    /// Connections closed while switched off or refusing them.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Bytes sent from the server to the client so far (counted when a connection ends).
    pub fn bytes_to_client(&self) -> u64 {
        self.state.to_client.load(Ordering::SeqCst)
    }

    /// Requests seen so far, in the order their connections were opened.
    pub fn requests(&self) -> Vec<Request> {
        self.state
            .heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| Request { head: h.clone() })
            .collect()
    }

    /// Forgets the requests and byte counts seen so far.
    pub fn reset(&self) {
        self.state.heads.lock().unwrap().clear();
        self.state.to_client.store(0, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads and discards what the client sends until it gives up and closes.
async fn swallow(mut client: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = client.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, st: Arc<State>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    // Read until the end of the request head (or 64 KiB), record it, send it on.
    let mut head = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if head.is_empty() {
        return;
    }
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len());
    let request = Request {
        head: String::from_utf8_lossy(&head[..end]).into_owned(),
    };
    if (st.refuse_parts.load(Ordering::SeqCst) && request.is_part_upload())
        || (st.refuse_copies.load(Ordering::SeqCst)
            && request.header("x-amz-copy-source").is_some())
    {
        st.refused.fetch_add(1, Ordering::SeqCst);
        return;
    }
    if request.is_part_upload()
        && st
            .parts_to_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        let length: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = head.len() - (end + 4).min(head.len());
        while body < length {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => body += n,
            }
        }
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code>\
                   <Message>injected by the test proxy</Message></Error>";
        let response = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        );
        let _ = client.write_all(response.as_bytes()).await;
        st.failed_with_500.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let hang = request.method() == "HEAD" && st.hang_heads.load(Ordering::SeqCst);
    st.heads.lock().unwrap().push(request.head);
    if hang {
        st.hung.fetch_add(1, Ordering::SeqCst);
        swallow(client).await;
        return;
    }
    if server.write_all(&head).await.is_err() {
        return;
    }
    if let Ok((_, down)) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        st.to_client.fetch_add(down, Ordering::SeqCst);
    }
}
