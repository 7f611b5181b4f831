//! Prometheus metrics. The names are part of vizor's interface (dashboards and alerts
//! depend on them); each is registered once here and updated where its event happens.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets, 100 µs to 10 s: loopback frames take well under a millisecond, a
/// congested WAN link seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every metric vizor exports.
pub struct Metrics {
    registry: Registry,
    /// `vizor_sessions_active{kind}`
    pub sessions_active: IntGaugeVec,
    /// `vizor_sessions_total{kind,outcome}`
    pub sessions_total: IntCounterVec,
    /// `vizor_session_bytes_total{kind,direction}`
    pub session_bytes_total: IntCounterVec,
    /// `vizor_spliced_bytes_total{kind}`
    pub spliced_bytes_total: IntCounterVec,
    /// `vizor_frame_latency_seconds{kind}`
    pub frame_latency_seconds: HistogramVec,
    /// `vizor_input_to_display_seconds{kind}`
    pub input_to_display_seconds: HistogramVec,
    /// `vizor_client_rtt_seconds{kind}`
    pub client_rtt_seconds: HistogramVec,
    /// `vizor_handshake_seconds{kind}`
    pub handshake_seconds: HistogramVec,
    /// `vizor_upstream_connect_seconds{kind}`
    pub upstream_connect_seconds: HistogramVec,
    /// `vizor_libvirt_lookup_seconds{host}`
    pub libvirt_lookup_seconds: HistogramVec,
    /// `vizor_libvirt_errors_total{host,reason}`
    pub libvirt_errors_total: IntCounterVec,
    /// `vizor_libvirt_up{host}`: 1 while the host's libvirt answers.
    pub libvirt_up: IntGaugeVec,
    /// `vizor_libvirt_lookups_running{host}`: lookups holding one of the host's turns.
    pub libvirt_lookups_running: IntGaugeVec,
    /// `vizor_auth_refusals_total{stage,reason}`
    pub auth_refusals_total: IntCounterVec,
    /// `vizor_api_requests_total{endpoint,code}`
    pub api_requests_total: IntCounterVec,
    /// `vizor_admin_actions_total{action}`
    pub admin_actions_total: IntCounterVec,
    /// `vizor_session_participants{role}`
    pub session_participants: IntGaugeVec,
    /// `vizor_session_resumes_total{outcome}`
    pub session_resumes_total: IntCounterVec,
    /// `vizor_audit_events_total{event}`
    pub audit_events_total: IntCounterVec,
    /// `vizor_audit_write_errors_total`
    pub audit_write_errors_total: IntCounter,
    /// `vizor_accept_errors_total{listener}`
    pub accept_errors_total: IntCounterVec,
    /// `vizor_audit_refusals_dropped_total`
    pub audit_refusals_dropped_total: IntCounter,
    /// `vizor_protocol_errors_total{kind,direction,reason}`
    pub protocol_errors_total: IntCounterVec,
    /// `vizor_connections_refused_total{reason}`
    pub connections_refused_total: IntCounterVec,
    /// `vizor_state_up`
    pub state_up: prometheus::IntGauge,
    /// `vizor_state_seconds{op}`
    pub state_seconds: HistogramVec,
    /// `vizor_state_errors_total{op}`
    pub state_errors_total: IntCounterVec,
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let m = Metrics {
            sessions_active: IntGaugeVec::new(
                Opts::new("vizor_sessions_active", "Console sessions (SPICE: channels) being relayed now."),
                &["kind"],
            )?,
            sessions_total: IntCounterVec::new(
                Opts::new("vizor_sessions_total", "Console sessions (SPICE: channels) ended, by how they ended."),
                &["kind", "outcome"],
            )?,
            session_bytes_total: IntCounterVec::new(
                Opts::new("vizor_session_bytes_total", "Bytes relayed, by direction (browser_to_vm, vm_to_browser)."),
                &["kind", "direction"],
            )?,
            spliced_bytes_total: IntCounterVec::new(
                Opts::new(
                    "vizor_spliced_bytes_total",
                    "Bytes of vm_to_browser moved socket to socket by splice(2), never read into vizor \
                     (a part of vizor_session_bytes_total).",
                ),
                &["kind"],
            )?,
            frame_latency_seconds: histogram(
                "vizor_frame_latency_seconds",
                "RFB: update request forwarded to the last byte of the update that answers it relayed. \
                 SPICE: server ping to client pong on the main channel.",
                &["kind"],
            )?,
            input_to_display_seconds: histogram(
                "vizor_input_to_display_seconds",
                "RFB: key or pointer event forwarded to the next framebuffer update relayed.",
                &["kind"],
            )?,
            client_rtt_seconds: histogram(
                "vizor_client_rtt_seconds",
                "WebSocket ping from vizor to the browser's pong: the browser's network round trip.",
                &["kind"],
            )?,
            handshake_seconds: histogram(
                "vizor_handshake_seconds",
                "From the WebSocket upgrade to the first relayed message: both legs' handshakes.",
                &["kind"],
            )?,
            upstream_connect_seconds: histogram(
                "vizor_upstream_connect_seconds",
                "Connecting to the VM's console (TCP or UNIX socket).",
                &["kind"],
            )?,
            libvirt_lookup_seconds: histogram(
                "vizor_libvirt_lookup_seconds",
                "Looking up a domain's console in libvirt, by host.",
                &["host"],
            )?,
            libvirt_errors_total: IntCounterVec::new(
                Opts::new("vizor_libvirt_errors_total", "Failed console lookups, by host and reason (host \"_unknown\": a token or request naming a host not configured)."),
                &["host", "reason"],
            )?,
            libvirt_up: IntGaugeVec::new(
                Opts::new("vizor_libvirt_up", "1 while the host's libvirt answers vizor's probes, else 0."),
                &["host"],
            )?,
            libvirt_lookups_running: IntGaugeVec::new(
                Opts::new("vizor_libvirt_lookups_running", "Lookups running on the host's libvirt, counting those that outlived their wait (at most 8 per host; a dead connection's are ended by libvirt's keepalive)."),
                &["host"],
            )?,
            auth_refusals_total: IntCounterVec::new(
                Opts::new(
                    "vizor_auth_refusals_total",
                    "Refused authentications: stage token (the browser's token), origin (a foreign page's WebSocket), api (the admin or metrics key) or upstream (vizor to the VM).",
                ),
                &["stage", "reason"],
            )?,
            api_requests_total: IntCounterVec::new(
                Opts::new(
                    "vizor_api_requests_total",
                    "Requests to the management API (console, sessions) and to /metrics on the main listener, by HTTP status.",
                ),
                &["endpoint", "code"],
            )?,
            admin_actions_total: IntCounterVec::new(
                Opts::new(
                    "vizor_admin_actions_total",
                    "Administrators' actions on live sessions through the management API: participant (a join token minted), watch (an observer token for the administrator), end, follow (an event stream opened).",
                ),
                &["action"],
            )?,
            session_participants: IntGaugeVec::new(
                Opts::new(
                    "vizor_session_participants",
                    "Participants connected to live sessions besides their owners, by role (operator, observer).",
                ),
                &["role"],
            )?,
            session_resumes_total: IntCounterVec::new(
                Opts::new(
                    "vizor_session_resumes_total",
                    "VNC consoles whose browser connection dropped (dropped), came back (resumed), or did not within [tokens] resume_window (window_expired); and refused resumes by reason (invalid, wrong_client, expired).",
                ),
                &["outcome"],
            )?,
            audit_events_total: IntCounterVec::new(
                Opts::new("vizor_audit_events_total", "Audit records written, by event."),
                &["event"],
            )?,
            audit_write_errors_total: IntCounter::new(
                "vizor_audit_write_errors_total",
                "Audit records that could not be written.",
            )?,
            accept_errors_total: IntCounterVec::new(
                Opts::new(
                    "vizor_accept_errors_total",
                    "Failed accepts (most often: out of open files), by listener (main, metrics); \
                     each is followed by a pause of up to 1 s.",
                ),
                &["listener"],
            )?,
            audit_refusals_dropped_total: IntCounter::new(
                "vizor_audit_refusals_dropped_total",
                "Records of refused unauthenticated requests not written because the audit queue \
                 was half full (live sessions' records keep the other half); their summaries count them.",
            )?,
            protocol_errors_total: IntCounterVec::new(
                Opts::new(
                    "vizor_protocol_errors_total",
                    "Sessions ended because a peer broke the protocol, by direction and reason.",
                ),
                &["kind", "direction", "reason"],
            )?,
            connections_refused_total: IntCounterVec::new(
                Opts::new(
                    "vizor_connections_refused_total",
                    "Connections closed at accept by [limits] max_connections (reason max_connections) \
                     or max_connections_per_client (reason max_connections_per_client).",
                ),
                &["reason"],
            )?,
            state_up: prometheus::IntGauge::new(
                "vizor_state_up",
                "1 while the shared state ([state] redis) answered its last operation, 0 when it did not or there is none.",
            )?,
            state_seconds: histogram(
                "vizor_state_seconds",
                "Operations on the shared state ([state] redis): spend (a token's single use), ping.",
                &["op"],
            )?,
            state_errors_total: IntCounterVec::new(
                Opts::new(
                    "vizor_state_errors_total",
                    "Operations on the shared state that failed or timed out, by operation.",
                ),
                &["op"],
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.sessions_active.clone()))?;
        r.register(Box::new(m.sessions_total.clone()))?;
        r.register(Box::new(m.session_bytes_total.clone()))?;
        r.register(Box::new(m.spliced_bytes_total.clone()))?;
        r.register(Box::new(m.frame_latency_seconds.clone()))?;
        r.register(Box::new(m.input_to_display_seconds.clone()))?;
        r.register(Box::new(m.client_rtt_seconds.clone()))?;
        r.register(Box::new(m.handshake_seconds.clone()))?;
        r.register(Box::new(m.upstream_connect_seconds.clone()))?;
        r.register(Box::new(m.libvirt_lookup_seconds.clone()))?;
        r.register(Box::new(m.libvirt_errors_total.clone()))?;
        r.register(Box::new(m.libvirt_up.clone()))?;
        r.register(Box::new(m.libvirt_lookups_running.clone()))?;
        r.register(Box::new(m.auth_refusals_total.clone()))?;
        r.register(Box::new(m.api_requests_total.clone()))?;
        r.register(Box::new(m.admin_actions_total.clone()))?;
        r.register(Box::new(m.session_participants.clone()))?;
        r.register(Box::new(m.session_resumes_total.clone()))?;
        r.register(Box::new(m.audit_events_total.clone()))?;
        r.register(Box::new(m.audit_write_errors_total.clone()))?;
        r.register(Box::new(m.audit_refusals_dropped_total.clone()))?;
        r.register(Box::new(m.accept_errors_total.clone()))?;
        r.register(Box::new(m.protocol_errors_total.clone()))?;
        r.register(Box::new(m.connections_refused_total.clone()))?;
        r.register(Box::new(m.state_up.clone()))?;
        r.register(Box::new(m.state_seconds.clone()))?;
        r.register(Box::new(m.state_errors_total.clone()))?;
        for op in crate::state::OPS {
            m.state_errors_total.with_label_values(&[op]);
            m.state_seconds.with_label_values(&[op]);
        }
        // Series that exist from the start, so rates over them work before traffic.
        for action in ["participant", "watch", "end", "follow"] {
            m.admin_actions_total.with_label_values(&[action]);
        }
        for role in ["operator", "observer"] {
            m.session_participants.with_label_values(&[role]);
        }
        // Input-to-display is measured for RFB only.
        m.input_to_display_seconds.with_label_values(&["vnc"]);
        for kind in ["vnc", "spice"] {
            m.spliced_bytes_total.with_label_values(&[kind]);
        }
        for listener in ["main", "metrics"] {
            m.accept_errors_total.with_label_values(&[listener]);
        }
        m.known_at_zero();
        for kind in ["vnc", "spice"] {
            m.sessions_active.with_label_values(&[kind]);
            for h in [
                &m.frame_latency_seconds,
                &m.client_rtt_seconds,
                &m.handshake_seconds,
                &m.upstream_connect_seconds,
            ] {
                h.with_label_values(&[kind]);
            }
            for dir in ["browser_to_vm", "vm_to_browser"] {
                m.session_bytes_total.with_label_values(&[kind, dir]);
            }
        }
        Ok(m)
    }

    /// Creates, at zero, the series of every label value the code can produce, so that
    /// alerts and `rate()` see zero rather than nothing before the first event.
    fn known_at_zero(&self) {
        use crate::end::{ChannelRefusal, End};
        for event in crate::audit::Event::NAMES {
            self.audit_events_total.with_label_values(&[event]);
        }
        for reason in crate::limits::ConnectionsFull::ALL
            .map(crate::limits::ConnectionsFull::label)
            .into_iter()
            .chain(["metrics_connections"])
        {
            self.connections_refused_total.with_label_values(&[reason]);
        }
        for outcome in ["dropped", "resumed", "window_expired"].into_iter().chain(
            crate::session::resume::ResumeError::ALL
                .map(crate::session::resume::ResumeError::label),
        ) {
            self.session_resumes_total.with_label_values(&[outcome]);
        }
        let outcomes = End::labels();
        for kind in ["vnc", "spice"] {
            for outcome in &outcomes {
                self.sessions_total.with_label_values(&[kind, outcome]);
            }
        }
        // What the token stage refuses: the token itself, or the session it names.
        let token = crate::token::TokenError::REASONS
            .iter()
            .copied()
            .chain(ChannelRefusal::ALL.map(ChannelRefusal::label))
            .chain(crate::live::JoinError::ALL.map(crate::live::JoinError::label))
            .chain(
                crate::session::resume::ResumeError::ALL
                    .map(crate::session::resume::ResumeError::reason),
            )
            .chain(["missing_token", "policy_unsupported", "throttled"]);
        let stages = token.map(|r| ("token", r)).chain([
            ("origin", "origin_not_allowed"),
            ("api", "bad_key"),
            ("api", "api_disabled"),
            ("upstream", "upstream_auth"),
        ]);
        for (stage, reason) in stages {
            self.auth_refusals_total.with_label_values(&[stage, reason]);
        }
        // Every endpoint's success, refused key and throttled client; its other
        // answers appear when they happen.
        for endpoint in [
            "sessions",
            "console",
            "hosts",
            "participant",
            "watch",
            "end",
            "events",
            "metrics",
        ] {
            for code in ["200", "401", "429"] {
                self.api_requests_total.with_label_values(&[endpoint, code]);
            }
        }
        // RFB's codec errors for VNC sessions (and the proxy's own checks of the
        // browser); SPICE's are one cause.
        for dir in ["browser_to_vm", "vm_to_browser"] {
            for cause in vizor_rfb::Error::LABELS.iter().chain(&["early_message"]) {
                self.protocol_errors_total
                    .with_label_values(&["vnc", dir, cause]);
            }
            self.protocol_errors_total
                .with_label_values(&["spice", dir, "spice"]);
        }
    }

    /// Adds a collector, such as the per-session series.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(c)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_help() {
        let m = Metrics::new().unwrap();
        m.sessions_total
            .with_label_values(&["vnc", "browser_closed"])
            .inc();
        m.frame_latency_seconds
            .with_label_values(&["vnc"])
            .observe(0.002);
        m.input_to_display_seconds
            .with_label_values(&["vnc"])
            .observe(0.01);
        m.handshake_seconds
            .with_label_values(&["vnc"])
            .observe(0.05);
        m.client_rtt_seconds
            .with_label_values(&["vnc"])
            .observe(0.001);
        m.upstream_connect_seconds
            .with_label_values(&["vnc"])
            .observe(0.0005);
        m.libvirt_lookup_seconds
            .with_label_values(&["default"])
            .observe(0.003);
        m.libvirt_errors_total
            .with_label_values(&["default", "not_running"])
            .inc();
        m.libvirt_up.with_label_values(&["default"]).set(1);
        m.auth_refusals_total
            .with_label_values(&["token", "expired"])
            .inc();
        m.audit_events_total.with_label_values(&["key"]).inc();
        m.audit_write_errors_total.inc();
        m.protocol_errors_total
            .with_label_values(&["vnc", "vm_to_browser", "x"])
            .inc();
        m.connections_refused_total
            .with_label_values(&["max_connections"])
            .inc();
        let text = m.render();
        for name in [
            "vizor_sessions_active",
            "vizor_sessions_total",
            "vizor_session_bytes_total",
            "vizor_frame_latency_seconds",
            "vizor_input_to_display_seconds",
            "vizor_client_rtt_seconds",
            "vizor_handshake_seconds",
            "vizor_upstream_connect_seconds",
            "vizor_libvirt_lookup_seconds",
            "vizor_libvirt_errors_total",
            "vizor_libvirt_up",
            "vizor_auth_refusals_total",
            "vizor_audit_events_total",
            "vizor_audit_write_errors_total",
            "vizor_audit_refusals_dropped_total",
            "vizor_accept_errors_total",
            "vizor_protocol_errors_total",
            "vizor_connections_refused_total",
            "vizor_state_up",
            "vizor_state_seconds",
            "vizor_state_errors_total",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} help");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} type");
        }
        assert!(text.contains("vizor_frame_latency_seconds_bucket{kind=\"vnc\",le=\"0.0025\"} 1"));
    }
}
