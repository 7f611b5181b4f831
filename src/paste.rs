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
