//! "Paste as keys": text from a console page typed into the VM by vizor, as key events
//! with the scancodes of the guest's layout, at a bounded rate, cancellable.
//!
//! A guest without a clipboard agent has no clipboard; typing is how text gets in. The
//! page sends the text (`POST /console/paste`); the connection it belongs to types it
//! through the same rules as the browser's own keys (the participant's input right,
//! QEMU's key queue, the audit record before each event goes on), each stroke on record
//! with `origin: "paste"`, between `paste` records that say what was pasted and how it
//! ended. vizor types rather than the page so that the record knows what the keys are:
//! a page could not mark its keys as pasted, and the audit is the truth of what reached
//! the VM.
//!
//! Each connection that can type has a [`Seat`] in its [`crate::live::Live`]: the
//! handler queues a [`Job`] there and the connection's relay types it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use vizor_keys::layout::Layout;

/// The longest text one paste may type, in characters.
pub const MAX_CHARS: usize = 4096;

/// The pause between two key events of a paste: at most 100 events a second, 25 to 50
/// characters (a character is two to six events). QEMU's key queue is paced as well.
pub const KEY_INTERVAL: Duration = Duration::from_millis(10);

/// What a paste types.
#[derive(Debug)]
pub struct Job {
    /// The text.
    pub text: String,
    /// The guest's layout.
    pub layout: Layout,
    /// Set to stop it before the next character.
    pub cancel: Arc<AtomicBool>,
}

/// How far a paste is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Characters typed.
    pub typed: usize,
    /// Characters in all.
    pub total: usize,
    /// The layout it is typed for.
    #[serde(skip)]
    pub layout: Layout,
}

/// The characters a paste types: a carriage return is none (CR LF is one Return).
pub fn chars(text: &str) -> usize {
    text.chars().filter(|&c| c != '\r').count()
}

/// Where a connection takes pastes.
#[derive(Debug, Clone)]
pub struct Seat {
    jobs: mpsc::Sender<Job>,
    progress: watch::Sender<Option<Progress>>,
    cancel: Arc<AtomicBool>,
    /// The layouts this console can type: all of them when QEMU acts on key numbers,
    /// only US when libvirt gave QEMU the en-us keymap (it maps keysyms itself), none
    /// with another keymap.
    layouts: &'static [Layout],
}

/// Why a paste was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// One is being typed.
    Typing,
    /// The connection is ending.
    Gone,
}

impl Seat {
    /// A seat for a console that can type `layouts`, and the receiving end its relay
    /// types from.
    pub fn new(layouts: &'static [Layout]) -> (Seat, Typing) {
        let (jobs, rx) = mpsc::channel(1);
        let (progress, _) = watch::channel(None);
        let seat = Seat {
            jobs,
            progress: progress.clone(),
            cancel: Arc::new(AtomicBool::new(false)),
            layouts,
        };
        (seat, Typing { jobs: rx, progress })
    }

    /// Whether this console can type for `layout`.
    pub fn accepts(&self, layout: Layout) -> bool {
        self.layouts.contains(&layout)
    }

    /// Queues `text` to be typed on `layout`; refused while another paste runs.
    pub fn paste(&self, text: String, layout: Layout) -> Result<(), Busy> {
        let total = chars(&text);
        // Taken, or found taken, in one step: of two at once, one wins.
        let took = self.progress.send_if_modified(|p| {
            if p.is_some() {
                return false;
            }
            *p = Some(Progress {
                typed: 0,
                total,
                layout,
            });
            true
        });
        if !took {
            return Err(Busy::Typing);
        }
        self.cancel.store(false, Ordering::SeqCst);
        let job = Job {
            text,
            layout,
            cancel: self.cancel.clone(),
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.progress.send_replace(None);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => Busy::Typing,
                    mpsc::error::TrySendError::Closed(_) => Busy::Gone,
                })
            }
        }
    }

    /// Stops the paste being typed before its next character; whether one was.
    pub fn cancel(&self) -> bool {
        let typing = self.progress.borrow().is_some();
        if typing {
            self.cancel.store(true, Ordering::SeqCst);
        }
        typing
    }

    /// The paste being typed, and each change of it.
    pub fn progress(&self) -> watch::Receiver<Option<Progress>> {
        self.progress.subscribe()
    }
}

/// The relay's end of a seat.
#[derive(Debug)]
pub struct Typing {
    jobs: mpsc::Receiver<Job>,
    progress: watch::Sender<Option<Progress>>,
}

impl Typing {
    /// The next paste to type; never returns once the seat is gone.
    pub async fn next(&mut self) -> Job {
        match self.jobs.recv().await {
            Some(job) => job,
            None => std::future::pending().await,
        }
    }

    /// `typed` characters of the paste are typed.
    pub fn typed(&self, typed: usize) {
        self.progress.send_modify(|p| {
            if let Some(p) = p {
                p.typed = typed.min(p.total);
            }
        });
    }

    /// The paste ended (typed or cancelled; an interrupted one never gets here).
    pub fn done(&self) {
        self.progress.send_replace(None);
    }

    /// Types each paste the seat takes, through `keys`, until one fails: that one
    /// keeps its progress, so the relay's end records it interrupted.
    pub(crate) async fn serve(
        &mut self,
        audit: &crate::audit::Audit,
        session: u64,
        keys: &mut impl Keys,
    ) -> Result<(), crate::end::End> {
        loop {
            let job = self.next().await;
            let caps = keys.caps_lock()?;
            type_job(audit, session, &job, self, caps, keys).await?;
            self.done();
        }
    }
}

/// Where a paste's key events go: the relay's way to judge, record, pace and write
/// one, as the browser's own.
pub(crate) trait Keys {
    /// Whether the guest's Caps Lock is on now.
    fn caps_lock(&self) -> Result<bool, crate::end::End>;

    /// Sends one key event.
    async fn key(&mut self, ev: vizor_keys::layout::Event) -> Result<(), crate::end::End>;
}

/// Types `job` for connection `session`: each character's key events through `keys`,
/// with a pause
/// between events; a `paste` record before the first key and one after the last. A
/// cancel takes effect between characters, so no key is left held and no dead key
/// waits. With the guest's Caps Lock on (`caps`), it is turned off around the text, as
/// a person would (how it changes a key differs between layouts and systems), and on
/// again after it, also after a stop.
pub(crate) async fn type_job(
    audit: &crate::audit::Audit,
    session: u64,
    job: &Job,
    typing: &Typing,
    caps: bool,
    keys: &mut impl Keys,
) -> Result<(), crate::end::End> {
    use crate::audit::Event;
    use crate::session::audit_failed;
    use vizor_keys::layout::{is_dead, Press, CAPS_LOCK};
    // The handler checked the text against the layout already.
    let Ok(presses) = job.layout.plan(&job.text, false) else {
        return Ok(());
    };
    // One character each: a dead key with the press after it, or one press.
    let mut each: Vec<&[Press]> = Vec::with_capacity(presses.len());
    let mut rest = &presses[..];
    while !rest.is_empty() {
        let n = if is_dead(rest[0].keysym) && rest.len() > 1 {
            2
        } else {
            1
        };
        let (char, after) = rest.split_at(n);
        each.push(char);
        rest = after;
    }
    let total = chars(&job.text);
    let sha256 = crate::audit::sha256_hex(job.text.as_bytes());
    let paste = |status, typed, sha256| Event::Paste {
        session,
        status,
        layout: job.layout.name(),
        chars: total,
        typed,
        sha256,
    };
    audit
        .record(&paste("started", None, Some(&sha256)))
        .await
        .map_err(audit_failed)?;
    tracing::info!(
        session,
        layout = job.layout.name(),
        chars = total,
        "paste typing"
    );
    if caps {
        press(keys, &[CAPS_LOCK]).await?;
    }
    let mut typed = 0;
    let mut cancelled = false;
    for char in each {
        if job.cancel.load(Ordering::SeqCst) {
            cancelled = true;
            break;
        }
        press(keys, char).await?;
        typed += 1;
        typing.typed(typed);
    }
    if caps {
        press(keys, &[CAPS_LOCK]).await?;
    }
    let status = if cancelled { "cancelled" } else { "done" };
    audit
        .record(&paste(status, Some(typed.min(total)), None))
        .await
        .map_err(audit_failed)?;
    tracing::info!(session, typed, status, "paste ended");
    Ok(())
}

/// Records how far a paste got that its connection's end stopped (its keys are on
/// record already); nothing when none was being typed.
pub(crate) async fn interrupted(
    audit: &crate::audit::Audit,
    session: u64,
    progress: Option<Progress>,
) {
    let Some(p) = progress else { return };
    let event = crate::audit::Event::Paste {
        session,
        status: "interrupted",
        layout: p.layout.name(),
        chars: p.total,
        typed: Some(p.typed),
        sha256: None,
    };
    if let Err(e) = audit.record(&event).await {
        tracing::warn!(error = %e, "audit log: the end of an interrupted paste not written");
    }
}

/// One character's key events, a pause after each.
async fn press(
    keys: &mut impl Keys,
    p: &[vizor_keys::layout::Press],
) -> Result<(), crate::end::End> {
    for ev in vizor_keys::layout::events(p) {
        keys.key(ev).await?;
        tokio::time::sleep(KEY_INTERVAL).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_seat_takes_one_paste_at_a_time_and_cancels_it() {
        let (seat, mut typing) = Seat::new(&Layout::ALL);
        let mut progress = seat.progress();
        seat.paste("ab\r\n".into(), Layout::Us).unwrap();
        let p = |typed| {
            Some(Progress {
                typed,
                total: 3,
                layout: Layout::Us,
            })
        };
        assert_eq!(*progress.borrow_and_update(), p(0));
        assert_eq!(seat.paste("c".into(), Layout::Us), Err(Busy::Typing));
        let job = typing.next().await;
        assert_eq!(job.text, "ab\r\n");
        assert!(seat.cancel());
        assert!(job.cancel.load(Ordering::SeqCst));
        typing.typed(1);
        assert_eq!(*progress.borrow_and_update(), p(1));
        typing.done();
        assert!(!seat.cancel(), "nothing to cancel");
        // The next paste starts uncancelled.
        seat.paste("d".into(), Layout::De).unwrap();
        assert!(!typing.next().await.cancel.load(Ordering::SeqCst));
        typing.done();
        // The relay is gone: a paste is refused, and the seat is free again.
        drop(typing);
        assert_eq!(seat.paste("e".into(), Layout::Us), Err(Busy::Gone));
        assert!(seat.progress.borrow().is_none());
    }

    #[test]
    fn a_seat_types_the_layouts_its_console_can() {
        let (seat, _typing) = Seat::new(&[Layout::Us]);
        assert!(seat.accepts(Layout::Us));
        assert!(!seat.accepts(Layout::De));
    }
}
