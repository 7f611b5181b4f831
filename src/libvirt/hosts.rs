//! Many libvirt hosts (`[[libvirt.hosts]]`): long-lived connections to each, kept
//! alive by libvirt's keepalive ([`super::pool`]), lookups bounded per host so that a
//! host that hangs costs only its own lookups, and a prober that says which hosts
//! answer (`/readyz`, `vizor_libvirt_up{host}`).

use super::{DomainRef, Libvirt, LookupError, Probe};
use crate::config::HostConfig;
use crate::metrics::Metrics;
use crate::token::ConsoleKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

/// Lookups one host runs at once; more wait for a turn (within [`LOOKUP_WAIT`]).
pub const LOOKUPS_PER_HOST: usize = 8;

/// How long a lookup waits for its host (its turn and the answer together).
pub const LOOKUP_WAIT: Duration = Duration::from_secs(15);

/// How long a probe waits for libvirt's answer (a libvirt just started may take a
/// while: its first start probes QEMU's capabilities).
pub const PROBE_WAIT: Duration = Duration::from_secs(30);

/// How often each host is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);

/// The label of lookups naming a host that is not configured, in
/// `vizor_libvirt_errors_total`: the name itself is anyone's choice.
pub const UNKNOWN_HOST_LABEL: &str = "_unknown";

/// The label of the outcome of a lookup that named no host (asked of every host), in
/// `vizor_libvirt_errors_total`.
pub const ANY_HOST_LABEL: &str = "_any";

type ProbeAnswer = tokio::sync::oneshot::Receiver<Result<Probe, LookupError>>;

/// One libvirt host.
pub struct Host {
    libvirt: Arc<Libvirt>,
    /// Up: answered its last probe (or lookup).
    up: AtomicBool,
    /// Why it is down, when it is.
    why: Mutex<String>,
    /// What its last answered probe said.
    last: Mutex<Option<Probe>>,
    turns: Arc<Semaphore>,
    /// The probe on its way, if one outlived its wait: the next probe awaits it, so a
    /// libvirt that never answers ties up one thread, not one per probe.
    probing: tokio::sync::Mutex<Option<ProbeAnswer>>,
    /// TLS toward this host's QEMU, when it has its own (`[libvirt.hosts.upstream_tls]`).
    pub upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name())
            .field("up", &self.is_up())
            .finish()
    }
}

impl Host {
    /// Its name.
    pub fn name(&self) -> &str {
        self.libvirt.host()
    }

    /// Its libvirt client.
    pub fn libvirt(&self) -> &Arc<Libvirt> {
        &self.libvirt
    }

    /// Whether it answered last time it was asked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// What its last answered probe said.
    pub fn last_probe(&self) -> Option<Probe> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    /// Why it is down ("" when up).
    pub fn why_down(&self) -> String {
        self.why.lock().map(|w| w.clone()).unwrap_or_default()
    }

    fn set(&self, up: bool, why: &str, metrics: &Metrics) {
        self.up.store(up, Ordering::SeqCst);
        if let Ok(mut w) = self.why.lock() {
            why.clone_into(&mut w);
        }
        metrics
            .libvirt_up
            .with_label_values(&[self.name()])
            .set(i64::from(up));
    }

    /// Runs `f` on one of this host's connections on the blocking pool, in one of its
    /// turns, for at most [`LOOKUP_WAIT`], counted in `running` while it runs. A call
    /// that outlives the wait keeps its turn until libvirt answers it or its keepalive
    /// closes the connection (see [`super::pool`]): a hung host ties up at most
    /// [`LOOKUPS_PER_HOST`] threads, and not for long. `Err(Busy)`: no turn came
    /// within the wait (the host is busy, not known down).
    async fn call<T: Send + 'static>(
        &self,
        running: prometheus::IntGauge,
        f: impl FnOnce(&Libvirt) -> Result<T, LookupError> + Send + 'static,
    ) -> Result<Result<T, LookupError>, Busy> {
        let unreachable = |message: String| LookupError::Unreachable {
            uri: self.libvirt.uri().to_owned(),
            message,
        };
        let deadline = tokio::time::Instant::now() + LOOKUP_WAIT;
        let turn = match tokio::time::timeout_at(deadline, self.turns.clone().acquire_owned()).await
        {
            Ok(Ok(turn)) => turn,
            _ => {
                return Err(Busy(unreachable(format!(
                "{LOOKUPS_PER_HOST} lookups on this host were waiting for libvirt already, for {}",
                humantime::format_duration(LOOKUP_WAIT)
            ))))
            }
        };
        let libvirt = self.libvirt.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let _running = Running::new(running);
            f(&libvirt)
        });
        Ok(match tokio::time::timeout_at(deadline, task).await {
            Err(_) => Err(unreachable(format!(
                "no answer within {}",
                humantime::format_duration(LOOKUP_WAIT)
            ))),
            Ok(Err(e)) => Err(unreachable(format!("lookup task failed: {e}"))),
            Ok(Ok(r)) => r,
        })
    }
}

/// A call counted as running while it lives (a panic in libvirt included).
struct Running(prometheus::IntGauge);

impl Running {
    fn new(gauge: prometheus::IntGauge) -> Running {
        gauge.inc();
        Running(gauge)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// No turn on a host came in time.
struct Busy(LookupError);

/// Every configured host.
pub struct Hosts {
    all: Vec<Arc<Host>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.all).finish()
    }
}

impl Hosts {
    /// The hosts of `configs`, each with its TLS toward QEMU if it has its own; none
    /// is contacted yet, and none is up until it answers.
    pub fn new(
        configs: &[HostConfig],
        metrics: Arc<Metrics>,
    ) -> Result<Hosts, Box<dyn std::error::Error>> {
        let mut all = Vec::with_capacity(configs.len());
        for c in configs {
            let upstream_tls = c
                .upstream_tls
                .as_ref()
                .map(|t| {
                    crate::tls::UpstreamTls::load(t)
                        .map_err(|e| format!("[[libvirt.hosts]] {:?} upstream_tls: {e}", c.name))
                })
                .transpose()?
                .map(Arc::new);
            metrics.libvirt_up.with_label_values(&[&c.name]).set(0);
            metrics
                .libvirt_lookups_running
                .with_label_values(&[&c.name])
                .set(0);
            metrics.libvirt_lookup_seconds.with_label_values(&[&c.name]);
            for reason in LookupError::REASONS {
                metrics
                    .libvirt_errors_total
                    .with_label_values(&[c.name.as_str(), reason]);
            }
            all.push(Arc::new(Host {
                libvirt: Libvirt::for_host(&c.name, &c.uri, c.console_address.as_deref()),
                up: AtomicBool::new(false),
                why: Mutex::new("not contacted yet".into()),
                last: Mutex::new(None),
                turns: Arc::new(Semaphore::new(LOOKUPS_PER_HOST)),
                probing: tokio::sync::Mutex::new(None),
                upstream_tls,
            }));
        }
        metrics
            .libvirt_errors_total
            .with_label_values(&[UNKNOWN_HOST_LABEL, "unknown_host"]);
        if all.len() > 1 {
            for reason in LookupError::REASONS {
                metrics
                    .libvirt_errors_total
                    .with_label_values(&[ANY_HOST_LABEL, reason]);
            }
        }
        Ok(Hosts { all, metrics })
    }

    /// Every host, in configuration order.
    pub fn all(&self) -> &[Arc<Host>] {
        &self.all
    }

    /// The host named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Host>> {
        self.all.iter().find(|h| h.name() == name)
    }

    /// Whether any host answers: vizor is ready for consoles.
    pub fn any_up(&self) -> bool {
        self.all.iter().any(|h| h.is_up())
    }

    /// Looks up `domain`'s console of `kind` on the host named `host`: what a token
    /// opens. Timed and counted per host.
    pub async fn lookup(
        &self,
        host: &str,
        domain: DomainRef,
        kind: ConsoleKind,
    ) -> Result<super::Console, LookupError> {
        let Some(h) = self.get(host) else {
            self.metrics
                .libvirt_errors_total
                .with_label_values(&[UNKNOWN_HOST_LABEL, "unknown_host"])
                .inc();
            return Err(LookupError::UnknownHost(host.to_owned()));
        };
        let r = self.lookup_on(h, domain, kind).await;
        if let Err(e) = &r {
            self.count(h.name(), e);
        }
        r
    }

    /// Looks up on `h`: timed, and marking the host down when libvirt did not answer
    /// (up when it did); counting is the caller's.
    async fn lookup_on(
        &self,
        h: &Arc<Host>,
        domain: DomainRef,
        kind: ConsoleKind,
    ) -> Result<super::Console, LookupError> {
        let started = Instant::now();
        let running = self
            .metrics
            .libvirt_lookups_running
            .with_label_values(&[h.name()]);
        let r = h
            .call(running, move |l| {
                l.lookup_blocking(&domain, kind, SystemTime::now())
            })
            .await;
        self.metrics
            .libvirt_lookup_seconds
            .with_label_values(&[h.name()])
            .observe(started.elapsed().as_secs_f64());
        match r {
            Err(Busy(e)) => Err(e),
            Ok(r) => {
                match &r {
                    Err(e @ LookupError::Unreachable { .. }) => {
                        h.set(false, &e.to_string(), &self.metrics);
                    }
                    _ => h.set(true, "", &self.metrics),
                }
                r
            }
        }
    }

    /// Counts a failed lookup on `host`.
    pub fn count(&self, host: &str, e: &LookupError) {
        let host = if self.get(host).is_some() {
            host
        } else {
            UNKNOWN_HOST_LABEL
        };
        self.metrics
            .libvirt_errors_total
            .with_label_values(&[host, e.reason()])
            .inc();
    }

    /// Finds `domain` and its console of `kind`: on `host` when it is named, else on
    /// every host that answers, at once. A UUID is one domain: found on one host, it
    /// is that one (found on several, the one running: a migrated domain leaves a copy
    /// defined on its old host). A name is another matter: on two hosts it is refused
    /// as ambiguous, and while any host does not answer it is refused as possibly on
    /// that one (it could be another VM of the same name), never guessed.
    pub async fn find(
        &self,
        host: Option<&str>,
        domain: DomainRef,
        kind: ConsoleKind,
    ) -> Result<super::Console, LookupError> {
        if let Some(host) = host {
            return self.lookup(host, domain, kind).await;
        }
        if let [only] = self.all.as_slice() {
            return self.lookup(only.name(), domain, kind).await;
        }
        let r = self.find_on_all(&domain, kind).await;
        if let Err(e) = &r {
            self.metrics
                .libvirt_errors_total
                .with_label_values(&[ANY_HOST_LABEL, e.reason()])
                .inc();
        }
        r
    }

    async fn find_on_all(
        &self,
        domain: &DomainRef,
        kind: ConsoleKind,
    ) -> Result<super::Console, LookupError> {
        let by_uuid = match domain {
            DomainRef::Uuid(_) => true,
            DomainRef::NameOrUuid(n) => super::looks_like_uuid(n),
        };
        let (asked, skipped): (Vec<_>, Vec<_>) = self.all.iter().partition(|h| h.is_up());
        let answers = futures_util::future::join_all(
            asked
                .iter()
                .map(|h| self.lookup_on(h, domain.clone(), kind)),
        )
        .await;
        let mut unreachable: Vec<String> = skipped.iter().map(|h| h.name().to_owned()).collect();
        let mut found = Vec::new();
        for (h, answer) in asked.iter().zip(answers) {
            match answer {
                Err(LookupError::NoSuchDomain(_)) => {}
                Err(e @ LookupError::Unreachable { .. }) => {
                    self.count(h.name(), &e);
                    unreachable.push(h.name().to_owned());
                }
                // Found there: running or not, with or without that console.
                other => found.push((h.name().to_owned(), other)),
            }
        }
        if by_uuid && found.len() > 1 {
            // One domain, defined on several hosts: the copy that runs.
            let running: Vec<usize> = (0..found.len())
                .filter(|&i| !matches!(found[i].1, Err(LookupError::NotRunning(_))))
                .collect();
            if let [one] = running.as_slice() {
                let kept = found.swap_remove(*one);
                found = vec![kept];
            }
        }
        decide(&domain.to_string(), by_uuid, found, unreachable).and_then(|(_, r)| r)
    }

    /// Probes `h` (or awaits the probe still on its way), on a thread of its own
    /// apart from the lookups' turns, for at most [`LOOKUP_WAIT`], and marks it up or
    /// down.
    pub async fn probe(&self, h: &Arc<Host>) -> Result<Probe, String> {
        let uri = h.libvirt.uri().to_owned();
        let mut probing = h.probing.lock().await;
        if probing.is_none() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let l = h.libvirt.clone();
            let spawned = std::thread::Builder::new()
                .name("vizor-libvirt".into())
                .spawn(move || {
                    let _ = tx.send(l.probe_blocking());
                });
            if let Err(e) = spawned {
                let e = format!("libvirt at {uri}: no thread for the probe: {e}");
                h.set(false, &e, &self.metrics);
                return Err(e);
            }
            *probing = Some(rx);
        }
        let Some(rx) = probing.as_mut() else {
            return Err(format!("libvirt at {uri}: no probe"));
        };
        let answered = tokio::time::timeout(PROBE_WAIT, rx).await;
        if answered.is_ok() {
            *probing = None;
        }
        drop(probing);
        let r = match answered {
            Err(_) => Err(format!(
                "libvirt at {uri} did not answer within {}",
                humantime::format_duration(PROBE_WAIT)
            )),
            Ok(Err(_)) => Err(format!(
                "libvirt at {uri}: the probe ended without an answer"
            )),
            Ok(Ok(Err(e))) => Err(match super::access_hint(&e.to_string()) {
                Some(hint) => format!("{e} ({hint})"),
                None => e.to_string(),
            }),
            Ok(Ok(Ok(p))) => Ok(p),
        };
        match &r {
            Ok(p) => {
                if let Ok(mut l) = h.last.lock() {
                    *l = Some(p.clone());
                }
                h.set(true, "", &self.metrics)
            }
            Err(e) => h.set(false, e, &self.metrics),
        }
        r
    }

    /// Probes every host at once.
    pub async fn probe_all(&self) -> Vec<Result<Probe, String>> {
        futures_util::future::join_all(self.all.iter().map(|h| self.probe(h))).await
    }
}

/// Which host `domain` (a name or a UUID) is on, and its name and UUID there, running
/// or not: what `vizor token` issues for. On `host` when it is named, else on every
/// configured host in turn (a name on two hosts is ambiguous). Blocking.
pub fn identify_blocking(
    configs: &[HostConfig],
    host: Option<&str>,
    domain: &str,
) -> Result<(String, String, [u8; 16]), LookupError> {
    let asked: Vec<&HostConfig> = match host {
        Some(name) => vec![configs
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| LookupError::UnknownHost(name.to_owned()))?],
        None => configs.iter().collect(),
    };
    if let [only] = asked.as_slice() {
        let (name, uuid) =
            Libvirt::for_host(&only.name, &only.uri, None).identify_blocking(domain)?;
        return Ok((only.name.clone(), name, uuid));
    }
    let mut found = Vec::new();
    let mut unreachable = Vec::new();
    for c in asked {
        match Libvirt::for_host(&c.name, &c.uri, None).identify_blocking(domain) {
            Ok(it) => found.push((c.name.clone(), it)),
            Err(LookupError::NoSuchDomain(_)) => {}
            Err(LookupError::Unreachable { .. }) => unreachable.push(c.name.clone()),
            Err(e) => return Err(e),
        }
    }
    decide(domain, super::looks_like_uuid(domain), found, unreachable)
        .map(|(host, (name, uuid))| (host, name, uuid))
}

/// What a search of every host says, from the hosts `found` it on (each with what it
/// said) and those `unreachable`: nowhere, the one host, or refused. A UUID is one
/// domain: found on one host, it is that one. A name is not guessed: on two hosts it
/// is ambiguous, and while any host did not answer it may be on that one.
fn decide<T>(
    domain: &str,
    by_uuid: bool,
    mut found: Vec<(String, T)>,
    unreachable: Vec<String>,
) -> Result<(String, T), LookupError> {
    match found.len() {
        0 if unreachable.is_empty() => Err(LookupError::NoSuchDomain(domain.to_owned())),
        1 if by_uuid || unreachable.is_empty() => found
            .pop()
            .ok_or_else(|| LookupError::NoSuchDomain(domain.to_owned())),
        0 | 1 => Err(LookupError::HostsUnreachable {
            domain: domain.to_owned(),
            hosts: unreachable,
        }),
        _ => Err(LookupError::Ambiguous {
            domain: domain.to_owned(),
            hosts: found.into_iter().map(|(h, _)| h).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(domains: &[(&str, &str)]) -> String {
        // libvirt's test driver: a node of its own, from XML.
        let mut xml = String::from("<node>");
        for (name, uuid) in domains {
            xml.push_str(&format!(
                "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><os><type>hvm</type></os>\
                 <devices><graphics type='vnc' port='5901' listen='127.0.0.1' passwd='pw'/></devices></domain>"
            ));
        }
        xml.push_str("</node>");
        let f = tempfile::Builder::new().suffix(".xml").tempfile().unwrap();
        let (_, path) = f.keep().unwrap();
        std::fs::write(&path, xml).unwrap();
        format!("test://{}", path.display())
    }

    fn hosts(uris: &[(&str, String)]) -> Hosts {
        let configs: Vec<HostConfig> = uris
            .iter()
            .map(|(name, uri)| HostConfig {
                name: (*name).into(),
                uri: uri.clone(),
                console_address: None,
                upstream_tls: None,
            })
            .collect();
        Hosts::new(&configs, Arc::new(Metrics::new().unwrap())).unwrap()
    }

    const U1: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";
    const U2: &str = "7695eb01-f6a4-8304-79aa-97f2502e193f";

    #[tokio::test]
    async fn a_name_on_one_host_is_found_there_and_on_two_is_ambiguous() {
        let h = hosts(&[
            (
                "a",
                node(&[
                    ("web", U1),
                    ("both", "8695eb01-f6a4-8304-79aa-97f2502e193f"),
                ]),
            ),
            (
                "b",
                node(&[("db", U2), ("both", "9695eb01-f6a4-8304-79aa-97f2502e193f")]),
            ),
        ]);
        for host in h.all() {
            h.probe(host).await.unwrap();
        }
        let c = h
            .find(None, DomainRef::NameOrUuid("db".into()), ConsoleKind::Vnc)
            .await
            .unwrap();
        assert_eq!((c.host.as_str(), c.domain.as_str()), ("b", "db"));
        let c = h
            .find(None, DomainRef::NameOrUuid(U1.into()), ConsoleKind::Vnc)
            .await
            .unwrap();
        assert_eq!((c.host.as_str(), c.domain.as_str()), ("a", "web"));
        match h
            .find(None, DomainRef::NameOrUuid("both".into()), ConsoleKind::Vnc)
            .await
        {
            Err(LookupError::Ambiguous { hosts, .. }) => assert_eq!(hosts, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        // Named, the host decides.
        let c = h
            .find(
                Some("b"),
                DomainRef::NameOrUuid("both".into()),
                ConsoleKind::Vnc,
            )
            .await
            .unwrap();
        assert_eq!(c.host, "b");
        assert!(matches!(
            h.find(None, DomainRef::NameOrUuid("none".into()), ConsoleKind::Vnc)
                .await,
            Err(LookupError::NoSuchDomain(_))
        ));
        assert!(matches!(
            h.find(Some("c"), DomainRef::NameOrUuid("db".into()), ConsoleKind::Vnc)
                .await,
            Err(LookupError::UnknownHost(n)) if n == "c"
        ));
    }

    #[tokio::test]
    async fn a_domain_missing_while_a_host_is_down_may_be_there() {
        let h = hosts(&[
            ("a", node(&[("web", U1)])),
            ("b", "test:///nonexistent/node.xml".into()),
        ]);
        for host in h.all() {
            let _ = h.probe(host).await;
        }
        assert!(h.get("a").unwrap().is_up());
        assert!(!h.get("b").unwrap().is_up());
        assert!(h.any_up());
        match h
            .find(None, DomainRef::NameOrUuid("db".into()), ConsoleKind::Vnc)
            .await
        {
            Err(LookupError::HostsUnreachable { hosts, .. }) => assert_eq!(hosts, ["b"]),
            other => panic!("{other:?}"),
        }
        // A name found on the host that answers may be another VM's on the one that
        // does not: refused, never guessed. A UUID is one domain: found.
        match h
            .find(None, DomainRef::NameOrUuid("web".into()), ConsoleKind::Vnc)
            .await
        {
            Err(LookupError::HostsUnreachable { hosts, .. }) => assert_eq!(hosts, ["b"]),
            other => panic!("{other:?}"),
        }
        let c = h
            .find(None, DomainRef::NameOrUuid(U1.into()), ConsoleKind::Vnc)
            .await
            .unwrap();
        assert_eq!(c.host, "a");
        // Named, it is asked of that host alone.
        let c = h
            .find(
                Some("a"),
                DomainRef::NameOrUuid("web".into()),
                ConsoleKind::Vnc,
            )
            .await
            .unwrap();
        assert_eq!(c.host, "a");
        let text = h.metrics.render();
        assert!(text.contains(r#"vizor_libvirt_up{host="a"} 1"#), "{text}");
        assert!(text.contains(r#"vizor_libvirt_up{host="b"} 0"#), "{text}");
    }
}
