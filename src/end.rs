//! How a session ended, as a type: the cause, the side that ended it, and the
//! direction a protocol error came from. The audit record's reason, the metrics label,
//! the WebSocket close code and what the browser is told all derive from the variant;
//! nothing downstream matches text.

use crate::live::Direction;
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// Who ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The browser: it closed, stalled, or broke the protocol.
    Browser,
    /// The VM's console: it closed, failed, refused vizor, or broke the protocol.
    Vm,
    /// vizor: a policy, a limit, a timeout, its audit log, or its shutdown.
    Vizor,
    /// An administrator, through the management API.
    Administrator,
}

impl Side {
    /// The side's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Browser => "browser",
            Side::Vm => "vm",
            Side::Vizor => "vizor",
            Side::Administrator => "administrator",
        }
    }
}

/// What vizor refused of what the browser (or its session) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A SetPixelFormat after the first update request.
    PixelFormatChange,
    /// The handshake (either leg) did not complete in time.
    HandshakeTimeout,
    /// A SPICE channel `[spice] allow_channels` does not allow.
    ChannelRefused,
    /// Guest agent data vizor does not pass.
    AgentRefused,
    /// A file transfer `[spice] file_transfer` does not allow.
    FileTransferRefused,
    /// A text WebSocket message.
    WebsocketText,
    /// A WebSocket framing error.
    WebsocketError,
    /// A spent token, presented again for a new session.
    TokenSpent,
    /// A SPICE channel that is not its session's (or a second main channel).
    Channel(ChannelRefusal),
    /// A `[limits]` bound on sessions.
    Limit(crate::limits::Full),
    /// A participant's token whose session cannot be joined.
    Join(crate::live::JoinError),
    /// The limits are counted across replicas and their shared state (Redis) does not
    /// answer: new sessions are refused until it does.
    StateUnavailable,
}

impl Refusal {
    /// The stable label, for metrics and the audit record.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PixelFormatChange => "pixel_format_change",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::ChannelRefused => "channel_refused",
            Refusal::AgentRefused => "agent_refused",
            Refusal::FileTransferRefused => "file_transfer_refused",
            Refusal::WebsocketText => "websocket_text",
            Refusal::WebsocketError => "websocket_error",
            Refusal::TokenSpent => "replayed",
            Refusal::Channel(why) => why.label(),
            Refusal::Limit(full) => full.label(),
            Refusal::Join(e) => e.label(),
            Refusal::StateUnavailable => "state_unavailable",
        }
    }
}

/// What failed toward the VM's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmFailure {
    /// libvirt's lookup of the console failed; `reason` is the lookup error's label and
    /// `told` what the browser is told.
    Lookup {
        /// The lookup error's stable label.
        reason: &'static str,
        /// What the browser is told.
        told: &'static str,
    },
    /// Connecting to the console failed.
    Connect,
    /// The console closed the connection during the handshake.
    Closed,
    /// Reading or writing failed.
    Io,
    /// The network to the console stopped carrying data.
    Stalled,
    /// TLS toward the console failed or is missing.
    Tls,
    /// The console refused vizor's authentication, or asks for what vizor lacks.
    Auth,
    /// The console refused the SPICE link.
    Link,
    /// The console asks for no password and `[libvirt] require_password` is set.
    NoPassword,
    /// The console's address is outside `[upstream] allow`: vizor did not connect.
    NotAllowed,
}

impl VmFailure {
    /// The stable label, for metrics and the audit record.
    pub fn label(self) -> &'static str {
        match self {
            VmFailure::Lookup { reason, .. } => reason,
            VmFailure::Connect => "upstream_connect",
            VmFailure::Closed => "upstream_closed",
            VmFailure::Io => "upstream_io",
            VmFailure::Stalled => "upstream_stalled",
            VmFailure::Tls => "upstream_tls",
            VmFailure::Auth => "upstream_auth",
            VmFailure::Link => "upstream_link",
            VmFailure::NoPassword => "no_password",
            VmFailure::NotAllowed => "upstream_not_allowed",
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The browser closed the session.
    BrowserClosed,
    /// The browser took no data for `[limits] send_timeout`.
    BrowserStalled(Duration),
    /// The VM's console closed the session.
    VmClosed,
    /// A peer broke the protocol: `dir` is the direction of what it sent, `cause` a
    /// stable label and `detail` what was wrong.
    Protocol {
        /// The direction the offending bytes travelled.
        dir: Direction,
        /// A stable cause, for metrics and the audit record.
        cause: &'static str,
        /// What was wrong ("protocol error: ...", "SPICE protocol error: ...").
        detail: String,
    },
    /// vizor refused what the browser did.
    Refused {
        /// What was refused.
        why: Refusal,
        /// The words for the browser and the record.
        detail: String,
    },
    /// Something failed toward the VM's console.
    Vm {
        /// What failed.
        why: VmFailure,
        /// The words for the record.
        detail: String,
    },
    /// No input for `[limits] idle_timeout`.
    Idle(Duration),
    /// vizor is shutting down.
    Shutdown,
    /// The audit log cannot be written: a session cannot go on without its records.
    Audit(String),
    /// An administrator ended the session.
    Terminated {
        /// Who, as the management API knows them.
        by: String,
        /// Why, in the administrator's words.
        reason: String,
    },
    /// A participant's connection ends with the session it joined: its owner left.
    OwnerLeft,
    /// The token's `max_duration` ran out.
    MaxDuration(Duration),
    /// A bug in vizor.
    Internal(&'static str),
}

impl End {
    /// A protocol error in what the browser sent, from its RFB codec.
    pub fn from_browser(e: &vizor_rfb::Error) -> End {
        End::rfb_protocol(Direction::BrowserToVm, e)
    }

    /// A protocol error in what the VM sent, from its RFB codec.
    pub fn from_vm(e: &vizor_rfb::Error) -> End {
        End::rfb_protocol(Direction::VmToBrowser, e)
    }

    /// A protocol error found by the RFB codec in what travelled `dir`.
    pub fn rfb_protocol(dir: Direction, e: &vizor_rfb::Error) -> End {
        End::Protocol {
            dir,
            cause: e.label(),
            detail: format!("protocol error: {e}"),
        }
    }

    /// A protocol error found by the SPICE codec in what travelled `dir`.
    pub fn spice_protocol(dir: Direction, e: &vizor_spice::Error) -> End {
        End::Protocol {
            dir,
            cause: "spice",
            detail: format!("SPICE protocol error: {e}"),
        }
    }

    /// The browser broke the protocol in a way its codec does not see (a step of the
    /// proxy's own): audited as a protocol error with `cause`, as codec errors are.
    pub fn browser_violation(what: &str, cause: &'static str) -> End {
        End::Protocol {
            dir: Direction::BrowserToVm,
            cause,
            detail: format!("protocol error: {what}"),
        }
    }

    /// vizor refused something.
    pub fn refused(why: Refusal, detail: impl Into<String>) -> End {
        End::Refused {
            why,
            detail: detail.into(),
        }
    }

    /// Something failed toward the VM.
    pub fn vm(why: VmFailure, detail: impl Into<String>) -> End {
        End::Vm {
            why,
            detail: detail.into(),
        }
    }

    /// The network to the VM stopped carrying the session's data.
    pub fn vm_stalled() -> End {
        End::vm(VmFailure::Stalled, "the network to the VM console stalled")
    }

    /// The lookup of the console failed.
    pub fn lookup(e: &crate::libvirt::LookupError) -> End {
        End::vm(
            VmFailure::Lookup {
                reason: e.reason(),
                told: e.told(),
            },
            e.to_string(),
        )
    }

    /// A `[limits]` bound refused the session.
    pub fn limit(full: crate::limits::Full) -> End {
        End::refused(Refusal::Limit(full), full.message())
    }

    /// No slot for the session: a limit, or the shared state that counts them.
    pub fn no_slot(no: crate::limits::NoSlot) -> End {
        match no {
            crate::limits::NoSlot::Full(full) => End::limit(full),
            // The token is spent by now: the page needs a new one.
            crate::limits::NoSlot::StateUnavailable => End::refused(
                Refusal::StateUnavailable,
                "vizor cannot start sessions now; try again with a new console link",
            ),
        }
    }

    /// Every [`End::label`]: the outcomes a session can have, for metrics to export
    /// at zero before the first of each.
    pub fn labels() -> Vec<&'static str> {
        const OWN: &[&str] = &[
            "browser_closed",
            "browser_stalled",
            "vm_closed",
            "protocol_error",
            "idle_timeout",
            "shutdown",
            "audit_error",
            "terminated",
            "owner_left",
            "max_duration",
            "internal",
        ];
        const REFUSALS: &[&str] = &[
            "pixel_format_change",
            "handshake_timeout",
            "channel_refused",
            "agent_refused",
            "file_transfer_refused",
            "websocket_text",
            "websocket_error",
            "replayed",
            "state_unavailable",
        ];
        const VM: &[&str] = &[
            "upstream_connect",
            "upstream_closed",
            "upstream_io",
            "upstream_stalled",
            "upstream_tls",
            "upstream_auth",
            "upstream_link",
            "no_password",
            "upstream_not_allowed",
        ];
        let mut all: Vec<&'static str> = OWN
            .iter()
            .chain(REFUSALS)
            .chain(VM)
            .copied()
            .chain(ChannelRefusal::ALL.map(ChannelRefusal::label))
            .chain(crate::limits::Full::ALL.map(crate::limits::Full::label))
            .chain(crate::live::JoinError::ALL.map(crate::live::JoinError::label))
            .chain(crate::libvirt::LookupError::REASONS.iter().copied())
            .collect();
        // "replayed" and "no_password" each come two ways.
        let mut seen = std::collections::HashSet::new();
        all.retain(|l| seen.insert(*l));
        all
    }

    /// A stable label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            End::BrowserClosed => "browser_closed",
            End::BrowserStalled(_) => "browser_stalled",
            End::VmClosed => "vm_closed",
            End::Protocol { .. } => "protocol_error",
            End::Refused { why, .. } => why.label(),
            End::Vm { why, .. } => why.label(),
            End::Idle(_) => "idle_timeout",
            End::Shutdown => "shutdown",
            End::Audit(_) => "audit_error",
            End::Terminated { .. } => "terminated",
            End::OwnerLeft => "owner_left",
            End::MaxDuration(_) => "max_duration",
            End::Internal(_) => "internal",
        }
    }

    /// The WebSocket close code the browser gets.
    pub fn close_code(&self) -> u16 {
        match self {
            End::BrowserClosed
            | End::VmClosed
            | End::Idle(_)
            | End::Terminated { .. }
            | End::OwnerLeft
            | End::MaxDuration(_) => 1000,
            End::Shutdown => 1001,
            // Try Again Later: nothing the browser did.
            End::Refused {
                why: Refusal::StateUnavailable,
                ..
            } => 1013,
            End::BrowserStalled(_) | End::Protocol { .. } | End::Refused { .. } => 1008,
            End::Vm { .. } | End::Audit(_) | End::Internal(_) => 1011,
        }
    }

    /// Who ended the session.
    pub fn side(&self) -> Side {
        match self {
            End::BrowserClosed | End::BrowserStalled(_) => Side::Browser,
            End::Protocol {
                dir: Direction::BrowserToVm,
                ..
            } => Side::Browser,
            End::VmClosed | End::Vm { .. } => Side::Vm,
            End::Protocol {
                dir: Direction::VmToBrowser,
                ..
            } => Side::Vm,
            End::Refused { .. }
            | End::Idle(_)
            | End::Shutdown
            | End::Audit(_)
            | End::OwnerLeft
            | End::MaxDuration(_)
            | End::Internal(_) => Side::Vizor,
            End::Terminated { .. } => Side::Administrator,
        }
    }

    /// For a protocol error: the direction that broke it and a stable cause.
    pub fn protocol(&self) -> Option<(Direction, &'static str)> {
        match self {
            End::Protocol { dir, cause, .. } => Some((*dir, cause)),
            _ => None,
        }
    }

    /// Whether the VM's side ended it: its console closed, failed or stopped reading.
    pub fn vm_gone(&self) -> bool {
        matches!(
            self,
            End::VmClosed
                | End::Vm {
                    why: VmFailure::Io | VmFailure::Stalled,
                    ..
                }
        )
    }

    /// Whether the browser's connection is gone or stopped taking data (not: the
    /// browser left with a close frame, which the relay sees apart).
    pub fn browser_gone(&self) -> bool {
        matches!(self, End::BrowserClosed | End::BrowserStalled(_))
    }

    /// Whether vizor failed to reach, open or keep the VM's console (audited as an
    /// upstream failure).
    pub fn upstream_failure(&self) -> Option<VmFailure> {
        match self {
            End::Vm { why, .. } => Some(*why),
            _ => None,
        }
    }

    /// What happened, for the log and the audit record.
    pub fn reason(&self) -> Cow<'_, str> {
        match self {
            End::BrowserClosed => "browser closed the connection".into(),
            End::BrowserStalled(t) => format!(
                "the browser took no data for {}",
                humantime::format_duration(*t)
            )
            .into(),
            End::VmClosed => "the VM closed the console connection".into(),
            End::Protocol { dir, detail, .. } => {
                let leg = match dir {
                    Direction::BrowserToVm => "browser",
                    Direction::VmToBrowser => "VM",
                };
                format!("{leg} {detail}").into()
            }
            End::Refused { detail, .. } | End::Vm { detail, .. } => detail.as_str().into(),
            End::Idle(idle) => format!(
                "closed after {} without input",
                humantime::format_duration(Duration::from_secs(idle.as_secs()))
            )
            .into(),
            End::Shutdown => "vizor is shutting down".into(),
            End::Audit(e) => format!("audit log cannot be written: {e}").into(),
            End::Terminated { by, reason } => {
                format!("ended by an administrator ({by}): {reason}").into()
            }
            End::OwnerLeft => "the session ended: its owner left".into(),
            End::MaxDuration(d) => format!(
                "the session reached its maximum duration of {}",
                humantime::format_duration(*d)
            )
            .into(),
            End::Internal(what) => format!("internal error: {what}").into(),
        }
    }

    /// What the browser is told in the close frame: the reason, but for a failed
    /// lookup, whose words may name libvirt's URI and the host's layout.
    pub fn told(&self) -> Cow<'_, str> {
        match self {
            End::Terminated { by, reason } => {
                format!("ended by an administrator ({by}): {reason}").into()
            }
            End::Vm {
                why: VmFailure::Lookup { told, .. },
                ..
            } => (*told).into(),
            _ => self.reason(),
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())
    }
}

/// Why a channel that is not a session's first main channel was refused. Each counts
/// as a failed token, like a refused token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelRefusal {
    /// A main channel for a new session, with a token spent already.
    Spent,
    /// A main channel that names a session (spice-server takes it for a migration
    /// target and drops the live client).
    SecondMain,
    /// The token's session is not linked (not yet, or no more).
    NoSession,
    /// Another session id than QEMU gave the token's session.
    WrongSession,
    /// From another address than the session's main channel.
    WrongClient,
}

impl ChannelRefusal {
    /// Every channel refusal.
    pub const ALL: [ChannelRefusal; 5] = [
        ChannelRefusal::Spent,
        ChannelRefusal::SecondMain,
        ChannelRefusal::NoSession,
        ChannelRefusal::WrongSession,
        ChannelRefusal::WrongClient,
    ];

    /// A stable label for metrics and audit records.
    pub fn label(self) -> &'static str {
        match self {
            ChannelRefusal::Spent => "replayed",
            ChannelRefusal::SecondMain => "spice_second_main",
            ChannelRefusal::NoSession => "spice_no_session",
            ChannelRefusal::WrongSession => "spice_wrong_session",
            ChannelRefusal::WrongClient => "spice_wrong_client",
        }
    }

    /// What the browser is told.
    pub(crate) fn told(self) -> &'static str {
        match self {
            ChannelRefusal::Spent => "token already used",
            ChannelRefusal::SecondMain => "a second SPICE main channel is not allowed",
            ChannelRefusal::NoSession | ChannelRefusal::WrongSession => {
                "token already used (not for this SPICE session)"
            }
            ChannelRefusal::WrongClient => "this SPICE session belongs to another address",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant: a new one must be added here, and its label to
    /// `End::labels`.
    #[test]
    fn every_label_is_listed() {
        let d = Duration::ZERO;
        let s = String::new;
        let mut each = vec![
            End::BrowserClosed,
            End::BrowserStalled(d),
            End::VmClosed,
            End::browser_violation("", "x"),
            End::Idle(d),
            End::Shutdown,
            End::Audit(s()),
            End::Terminated {
                by: s(),
                reason: s(),
            },
            End::OwnerLeft,
            End::MaxDuration(d),
            End::Internal(""),
        ];
        let refusals = [
            Refusal::PixelFormatChange,
            Refusal::HandshakeTimeout,
            Refusal::ChannelRefused,
            Refusal::AgentRefused,
            Refusal::FileTransferRefused,
            Refusal::WebsocketText,
            Refusal::WebsocketError,
            Refusal::TokenSpent,
            Refusal::StateUnavailable,
        ]
        .into_iter()
        .chain(ChannelRefusal::ALL.map(Refusal::Channel))
        .chain(crate::limits::Full::ALL.map(Refusal::Limit))
        .chain(crate::live::JoinError::ALL.map(Refusal::Join));
        each.extend(refusals.map(|why| End::refused(why, "")));
        let failures = [
            VmFailure::Connect,
            VmFailure::Closed,
            VmFailure::Io,
            VmFailure::Stalled,
            VmFailure::Tls,
            VmFailure::Auth,
            VmFailure::Link,
            VmFailure::NoPassword,
            VmFailure::NotAllowed,
        ];
        each.extend(failures.map(|why| End::vm(why, "")));
        let labels = End::labels();
        let mut produced: Vec<_> = each.iter().map(End::label).collect();
        produced.extend(crate::libvirt::LookupError::REASONS);
        for l in &produced {
            assert!(labels.contains(l), "{l} is not listed");
        }
        for l in &labels {
            assert!(produced.contains(l), "{l} is listed but no end has it");
        }
    }

    #[test]
    fn each_end_derives_its_label_code_and_side() {
        let cases: Vec<(End, &str, u16, Side)> = vec![
            (End::BrowserClosed, "browser_closed", 1000, Side::Browser),
            (
                End::BrowserStalled(Duration::from_secs(5)),
                "browser_stalled",
                1008,
                Side::Browser,
            ),
            (End::VmClosed, "vm_closed", 1000, Side::Vm),
            (
                End::from_browser(&vizor_rfb::Error::UnknownMessageType(99)),
                "protocol_error",
                1008,
                Side::Browser,
            ),
            (
                End::from_vm(&vizor_rfb::Error::UnknownMessageType(99)),
                "protocol_error",
                1008,
                Side::Vm,
            ),
            (
                End::refused(Refusal::PixelFormatChange, "no"),
                "pixel_format_change",
                1008,
                Side::Vizor,
            ),
            (
                End::refused(Refusal::TokenSpent, "token already used"),
                "replayed",
                1008,
                Side::Vizor,
            ),
            (
                End::vm(VmFailure::Auth, "QEMU said no"),
                "upstream_auth",
                1011,
                Side::Vm,
            ),
            (End::vm_stalled(), "upstream_stalled", 1011, Side::Vm),
            (
                End::Idle(Duration::from_secs(60)),
                "idle_timeout",
                1000,
                Side::Vizor,
            ),
            (End::Shutdown, "shutdown", 1001, Side::Vizor),
            (
                End::Audit("disk full".into()),
                "audit_error",
                1011,
                Side::Vizor,
            ),
            (
                End::Terminated {
                    by: "ops".into(),
                    reason: "maintenance".into(),
                },
                "terminated",
                1000,
                Side::Administrator,
            ),
            (
                End::Internal("lock poisoned"),
                "internal",
                1011,
                Side::Vizor,
            ),
        ];
        for (end, label, code, side) in cases {
            assert_eq!(end.label(), label, "{end:?}");
            assert_eq!(end.close_code(), code, "{end:?}");
            assert_eq!(end.side(), side, "{end:?}");
        }
    }

    #[test]
    fn reasons_read_as_before() {
        let e = End::from_vm(&vizor_rfb::Error::UnknownMessageType(99));
        assert_eq!(e.reason(), "VM protocol error: unknown message type 99");
        assert_eq!(
            e.protocol(),
            Some((Direction::VmToBrowser, "unknown_message_type"))
        );
        let e = End::browser_violation("messages sent before ServerInit", "early_message");
        assert_eq!(
            e.reason(),
            "browser protocol error: messages sent before ServerInit"
        );
        assert_eq!(
            End::Idle(Duration::from_millis(61_500)).reason(),
            "closed after 1m 1s without input"
        );
        assert_eq!(
            End::Audit("disk full".into()).reason(),
            "audit log cannot be written: disk full"
        );
    }

    #[test]
    fn only_the_vms_own_end_skips_the_orderly_close() {
        assert!(End::VmClosed.vm_gone());
        assert!(End::vm(VmFailure::Io, "reset").vm_gone());
        assert!(End::vm_stalled().vm_gone());
        assert!(!End::vm(VmFailure::Auth, "no").vm_gone());
        assert!(!End::BrowserClosed.vm_gone());
    }

    #[test]
    fn a_failed_lookup_tells_the_browser_less_than_the_record() {
        let e = End::vm(
            VmFailure::Lookup {
                reason: "unreachable",
                told: "the VM console cannot be reached",
            },
            "libvirt at qemu+ssh://admin@host/system: connection refused",
        );
        assert_eq!(e.told(), "the VM console cannot be reached");
        assert!(e.reason().contains("qemu+ssh"));
        assert_eq!(e.label(), "unreachable");
    }
}
