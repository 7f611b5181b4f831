//! The Grafana dashboard (`grafana/vizor.json`) against the code: it is importable
//! (a Prometheus datasource variable that every panel uses), it has the panels
//! operators need, and every metric it names is one vizor exports. Its queries run
//! against a real Prometheus in `tests/prometheus_live.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::metric_names;

use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use vizor::live::{Direction, Identity, Latency, LiveSessions, PerSession};
use vizor::metrics::Metrics;
use vizor::token::ConsoleKind;

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::DASHBOARD).unwrap()).unwrap()
}

fn panels(d: &Value) -> Vec<&Value> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

fn exprs(p: &Value) -> Vec<&str> {
    p["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["expr"].as_str().unwrap())
        .collect()
}

#[test]
fn it_is_importable_with_a_prometheus_datasource_variable() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["type"] == "datasource").unwrap();
    assert_eq!(ds["query"], "prometheus");
    let var = format!("${{{}}}", ds["name"].as_str().unwrap());
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        assert_eq!(p["datasource"]["type"], "prometheus", "{}", p["title"]);
        assert_eq!(p["datasource"]["uid"], var.as_str(), "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], var.as_str(), "{}", p["title"]);
        }
        assert!(!p["description"].as_str().unwrap().is_empty());
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap();
        let latency = exprs(p).iter().any(|e| e.contains("_seconds"));
        assert_eq!(latency, unit == "s", "{}: unit {unit}", p["title"]);
    }
    // No two panels overlap on the grid.
    let mut cells = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{} overlaps", p["title"]);
            }
        }
    }
}

#[test]
fn it_has_the_panels_operators_need() {
    let d = dashboard();
    let all: Vec<(String, Vec<&str>)> = panels(&d)
        .into_iter()
        .map(|p| (p["title"].as_str().unwrap().to_owned(), exprs(p)))
        .collect();
    let panel_reading = |needle: &str| {
        all.iter()
            .find(|(_, e)| e.iter().any(|e| e.contains(needle)))
            .unwrap_or_else(|| panic!("no panel reads {needle}"))
    };
    panel_reading("vizor_sessions_active");
    panel_reading("vizor_session_participants");
    panel_reading("vizor_admin_actions_total");
    panel_reading("direction=\"vm_to_browser\"");
    panel_reading("direction=\"browser_to_vm\"");
    let (_, frame) = panel_reading("vizor_frame_latency_seconds_bucket");
    for q in ["0.5", "0.95", "0.99"] {
        let wanted = format!("histogram_quantile({q},");
        assert!(frame.iter().any(|e| e.starts_with(&wanted)), "frame p{q}");
    }
    for needle in [
        "vizor_input_to_display_seconds_bucket",
        "vizor_client_rtt_seconds_bucket",
        "vizor_handshake_seconds_bucket",
        "vizor_auth_refusals_total",
        "vizor_protocol_errors_total",
        "vizor_audit_write_errors_total",
    ] {
        panel_reading(needle);
    }
    // Refusals are shown by reason.
    let (_, refusals) = panel_reading("vizor_auth_refusals_total");
    assert!(refusals.iter().all(|e| e.contains("reason")));
}

#[test]
fn every_metric_it_names_is_exported() {
    let metrics = Metrics::new().unwrap();
    let live = Arc::new(LiveSessions::default());
    metrics
        .register(Box::new(PerSession::new(live.clone(), 10).unwrap()))
        .unwrap();
    // One live session with a sample of everything, so every family has a series.
    let hold = live.hold(
        Identity {
            id: 1,
            kind: ConsoleKind::Vnc,
            user: "u",
            domain: "d",
            uuid: "00000000-0000-0000-0000-000000000001",
            host: "default",
            token_id: "t",
            client: "127.0.0.1:1".parse().unwrap(),
        },
        None,
    );
    hold.live().bytes(Direction::VmToBrowser, 1);
    for l in [Latency::Frame, Latency::InputToDisplay, Latency::ClientRtt] {
        hold.live().observe(l, Duration::from_millis(1));
    }
    // Counters labelled by reason exist once something happened.
    metrics
        .sessions_total
        .with_label_values(&["vnc", "browser_closed"])
        .inc();
    metrics
        .auth_refusals_total
        .with_label_values(&["token", "expired"])
        .inc();
    metrics
        .libvirt_errors_total
        .with_label_values(&["default", "no_such_domain"])
        .inc();
    metrics
        .libvirt_lookup_seconds
        .with_label_values(&["default"])
        .observe(0.001);
    metrics.libvirt_up.with_label_values(&["default"]).set(1);
    metrics
        .protocol_errors_total
        .with_label_values(&["vnc", "browser", "unknown_message_type"])
        .inc();
    metrics.audit_events_total.with_label_values(&["key"]).inc();
    let text = metrics.render();
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let d = dashboard();
    let mut named = BTreeSet::new();
    for p in panels(&d) {
        for e in exprs(p) {
            named.extend(metric_names(e));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            named.extend(metric_names(q));
        }
    }
    assert!(named.len() >= 15, "{named:?}");
    let missing: Vec<_> = named.iter().filter(|n| !exported.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "named by the dashboard, not exported: {missing:?}"
    );
}
