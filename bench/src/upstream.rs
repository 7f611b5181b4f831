//! The synthetic VMs: vizor-testkit's VNC double (`vizor_testkit::vnc`), an RFB 3.8
//! server that demands VNC authentication, serving its fast [`Screen`]: every
//! FramebufferUpdateRequest is answered at once with one Raw rectangle covering exactly
//! the requested area. It must outrun any proxy (QEMU cannot reach GB/s), so the two
//! answers the cases ask for, the full 1920x1080x32 screen and a 16x16 tile, are built
//! once and written whole with one `write_all` each; anything else is built on demand.
//!
//! Every listener is one libvirt test domain (its own port and password). The
//! screen's counters of what was sent after ServerInit let a case check the client's
//! account.

use std::sync::Arc;
use vizor_testkit::vnc::{Auth, Double, Screen, Served};

pub use vizor_testkit::vnc::Sent;

/// The synthetic screen.
pub const WIDTH: u16 = 1920;
/// The synthetic screen.
pub const HEIGHT: u16 = 1080;
/// The desktop name in ServerInit, which clients check.
pub const DESKTOP: &str = "vizor-bench";
/// The small update's tile.
pub const TILE: u16 = 16;

/// The bytes of a FramebufferUpdate with one Raw rectangle `w` x `h` at `x`,`y`.
pub fn update_len(w: u16, h: u16) -> u64 {
    vizor_testkit::vnc::raw_update_len(w, h)
}

/// One domain's console: where it listens and its VNC password.
#[derive(Debug, Clone)]
pub struct Console {
    /// The libvirt domain name.
    pub domain: String,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The VNC password (8 characters: VNC authentication uses 8).
    pub password: String,
}

/// The running synthetic VMs.
pub struct Upstream {
    /// One per domain.
    pub consoles: Vec<Console>,
    /// The screen all of them serve, with its counters.
    pub screen: Arc<Screen>,
    /// The listeners: dropping them stops them.
    _served: Vec<Served>,
}

impl Upstream {
    /// Starts `domains` listeners on 127.0.0.1, each with a fresh random password.
    pub async fn start(domains: usize) -> std::io::Result<Upstream> {
        let screen = Arc::new(Screen::new(WIDTH, HEIGHT, DESKTOP).prebuild(0, 0, TILE, TILE));
        let mut consoles = Vec::new();
        let mut served = Vec::new();
        for d in 0..domains {
            let password = password();
            let screen = screen.clone();
            let s = Double::new(Auth::Password(password.clone()))
                .listen(move |conn| {
                    let screen = screen.clone();
                    async move { screen.serve(conn).await }
                })
                .await?;
            consoles.push(Console {
                domain: format!("bench-{d:02}"),
                port: s.port(),
                password,
            });
            served.push(s);
        }
        Ok(Upstream {
            consoles,
            screen,
            _served: served,
        })
    }
}

/// Eight random alphanumeric characters.
fn password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 8)
}
