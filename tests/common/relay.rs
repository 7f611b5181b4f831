//! A TCP relay between a browser and vizor that a test can cut: the network blip (a
//! Wi-Fi hand-over, a proxy restarting) that no real part here produces on demand. A
//! test double for that fault alone: both ends are the real browser and vizor.
//!
//! A cut shuts every relayed connection down both ways, so each end sees its
//! connection end without a WebSocket close frame. While blocked, new connections are
//! accepted and closed at once (the network is still down). `control` takes
//! `GET /cut` and `GET /block?ms=N` over HTTP, for a browser script to call.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The relay: browsers connect to `addr` instead of vizor.
pub struct CutRelay {
    /// Where browsers connect.
    pub addr: SocketAddr,
    /// Where `GET /cut` and `GET /block?ms=N` go.
    pub control: SocketAddr,
    inner: Arc<Inner>,
}

struct Inner {
    target: SocketAddr,
    /// Both sockets of every relayed connection.
    conns: Mutex<Vec<TcpStream>>,
    blocked_until: Mutex<Option<Instant>>,
    /// Connections relayed so far.
    relayed: Mutex<usize>,
}

impl Inner {
    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn blocked(&self) -> bool {
        self.blocked_until
            .lock()
            .unwrap()
            .is_some_and(|t| Instant::now() < t)
    }
}

impl CutRelay {
    /// Relays connections to `target`.
    pub fn start(target: SocketAddr) -> CutRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let control = TcpListener::bind("127.0.0.1:0").unwrap();
        let inner = Arc::new(Inner {
            target,
            conns: Mutex::default(),
            blocked_until: Mutex::default(),
            relayed: Mutex::default(),
        });
        let relay = CutRelay {
            addr: listener.local_addr().unwrap(),
            control: control.local_addr().unwrap(),
            inner: inner.clone(),
        };
        let accepting = inner.clone();
        std::thread::spawn(move || {
            for browser in listener.incoming() {
                let Ok(browser) = browser else { continue };
                if accepting.blocked() {
                    let _ = browser.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(vizor) = TcpStream::connect(accepting.target) else {
                    continue;
                };
                *accepting.relayed.lock().unwrap() += 1;
                {
                    let mut conns = accepting.conns.lock().unwrap();
                    conns.push(browser.try_clone().unwrap());
                    conns.push(vizor.try_clone().unwrap());
                }
                pump(browser.try_clone().unwrap(), vizor.try_clone().unwrap());
                pump(vizor, browser);
            }
        });
        let controlled = inner;
        std::thread::spawn(move || {
            for s in control.incoming() {
                let Ok(mut s) = s else { continue };
                let mut line = String::new();
                let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
                let path = line.split(' ').nth(1).unwrap_or("");
                if path == "/cut" {
                    controlled.cut();
                } else if let Some(ms) = path.strip_prefix("/block?ms=") {
                    let ms: u64 = ms.parse().unwrap_or(0);
                    *controlled.blocked_until.lock().unwrap() =
                        Some(Instant::now() + Duration::from_millis(ms));
                    controlled.cut();
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        relay
    }

    /// Cuts every relayed connection.
    pub fn cut(&self) {
        self.inner.cut();
    }

    /// Connections relayed so far.
    pub fn relayed(&self) -> usize {
        *self.inner.relayed.lock().unwrap()
    }
}

/// Copies `from` to `to` until either ends, then shuts `to` down.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
    });
}
