//! The `vizor` command line: `serve`, `keygen`, `token`, `audit`.

use crate::audit::ChainKey;
use crate::config::Config;
use crate::token::{ConsoleKind, Issued, TokenKey};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// vizor: a protocol-aware, terminating WebSocket proxy for VNC and SPICE consoles.
#[derive(Debug, Parser)]
#[command(
    name = "vizor",
    version,
    about,
    after_long_help = "\
Files, as the Debian package installs them:
  /etc/vizor/vizor.toml: the configuration
  /etc/vizor/token.key: the token key
  /etc/vizor/audit.key: the audit chain's key
  /var/log/vizor/audit.jsonl: the audit log
  /var/lib/vizor/recordings: session recordings

Signals to vizor serve:
  SIGTERM, SIGINT: stop accepting; sessions go on for
    shutdown_grace, then are closed
  SIGHUP: reload the TLS certificate and key

HTTP: /healthz (alive), /readyz (libvirt reached),
/metrics, /console, /websockify, /api/v1/.

Exit status: 0 on success, 1 on an error, which the
message on standard error names."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// The vizor configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration without serving (like `nginx -t`).
    ///
    /// Reads the file, the key files and TLS files, looks at the audit log's place and
    /// asks libvirt, as `vizor serve` would at start; warns of running consoles without
    /// a password. Exit status 1 if `vizor serve` would refuse to start. Run it as the
    /// user vizor runs as (`sudo -u vizor vizor check ...`): access is checked as this
    /// one.
    Check {
        /// The vizor configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a fresh random key to FILE (mode 0600; never overwrites): for `[tokens]
    /// key_file` or `[audit] key_file`, each its own.
    Keygen {
        /// Where to write the key.
        file: PathBuf,
    },
    /// Print a console token for a domain (the last line of standard output).
    Token {
        /// The vizor configuration file (its `[tokens] key_file` seals the token).
        #[arg(long)]
        config: PathBuf,
        /// libvirt domain name or UUID: the token opens that domain, by its UUID (vizor
        /// asks libvirt which domain it is, so the config's libvirt must be reachable).
        #[arg(long)]
        domain: String,
        /// The libvirt host the domain is on (a `[[libvirt.hosts]]` name); without it,
        /// vizor asks every host and refuses a name found on more than one.
        #[arg(long)]
        host: Option<String>,
        /// Console kind.
        #[arg(long, default_value = "vnc")]
        kind: ConsoleKind,
        /// Token lifetime, such as 60s or 5m (default: `[tokens] ttl`).
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        /// Who the token is for, as recorded in the audit log (default: $USER).
        #[arg(long)]
        user: Option<String>,
        /// Bind the token to the browser's address: a connection from any other
        /// address is refused, and the token is not spent by it.
        #[arg(long, value_name = "IP")]
        client: Option<std::net::IpAddr>,
        /// The holder sees the screen; keyboard, pointer and clipboard reach nothing
        /// (VNC).
        #[arg(long)]
        view_only: bool,
        /// Which ways clipboard contents pass: none, to_vm, from_vm or both (VNC).
        #[arg(long, default_value = "both", value_name = "WAYS")]
        clipboard: crate::token::ClipboardWays,
        /// The session ends this long after it started, such as 30m (at most 7 days).
        #[arg(long, value_name = "DURATION")]
        max_duration: Option<humantime::Duration>,
    },
    /// Serve a session recording (`[audit] record_dir`) to noVNC for review: open
    /// http://ADDR/ with `--novnc` (vizor's console page), or
    /// http://ADDR/vnc.html?autoconnect=true with `--web-root` set to noVNC's app.
    Replay {
        /// The recording.
        file: PathBuf,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:6081")]
        listen: std::net::SocketAddr,
        /// Playback speed: 1 real time, 4 four times faster, 0 without waiting.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Static files served under / (noVNC's app, such as /usr/share/novnc).
        #[arg(long)]
        web_root: Option<PathBuf>,
        /// noVNC's npm package `@novnc/novnc` (as `[console] novnc`): serves vizor's
        /// console page at /.
        #[arg(long)]
        novnc: Option<PathBuf>,
    },
    /// Review audit logs.
    Audit {
        /// What to do with them.
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// `vizor audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the HMAC chain of audit log files, given oldest first (rotated files, then
    /// the current one); report the first broken record. Exit status 1 if broken.
    Verify {
        #[command(flatten)]
        key: ChainKeyArg,
        /// The files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the sessions in audit log files: id, user, domain, kind, start,
    /// duration, keys pressed, how it ended.
    Sessions {
        #[command(flatten)]
        key: OptionalChainKey,
        /// The files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print what was typed in one session: shift applied, BackSpace deleting,
    /// Return a new line, other keys and control combinations as `<Ctrl+Alt+Delete>`.
    Text {
        #[command(flatten)]
        key: OptionalChainKey,
        /// The session: its id as `vizor audit sessions` shows it (`ID`, or `ID@RUN`
        /// when ids of several runs of vizor collide).
        #[arg(long)]
        session: String,
        /// The files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the last records of an audit log, one line each, with the text each key
    /// typed; with --follow, go on printing records as vizor writes them (across
    /// rotations), as the management API's event stream does. Not verified: use
    /// `vizor audit verify` for that.
    Tail {
        /// Go on printing records as they are written, until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only this session: its records, its participants' and the administrators'
        /// actions on it (of the run of vizor that writes the log now).
        #[arg(long)]
        session: Option<u64>,
        /// How many of the last lines to print first.
        #[arg(long, short = 'n', default_value_t = 10)]
        lines: usize,
        /// The log (`[audit] path`).
        file: PathBuf,
    },
}

/// A chain key to verify the files with first (recommended).
#[derive(Debug, clap::Args)]
#[group(required = false, multiple = false)]
pub struct OptionalChainKey {
    /// Verify with this audit key file first; refuse a broken log.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Verify with this configuration's audit key first; refuse a broken log.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl OptionalChainKey {
    /// The records of `files`: with a key only those the chain authenticates (and
    /// none of a broken log), without one every record, said to be unverified.
    fn records(
        &self,
        files: &[PathBuf],
    ) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
        if self.key.is_none() && self.config.is_none() {
            eprintln!("vizor: not verified (give --key or --config to check the chain first)");
            return Ok(crate::audit::review::read(files)?);
        }
        let key = ChainKeyArg {
            key: self.key.clone(),
            config: self.config.clone(),
        }
        .load()?;
        let (report, records) = crate::audit::chain::verified_records(&key, files)
            .map_err(|e| format!("reading the audit log: {e}"))?;
        if let Some((file, line, why)) = report.broken {
            return Err(format!("BROKEN at {file}:{line}: {why}; not reading a broken log").into());
        }
        eprintln!("vizor: chain verified ({} records)", report.records);
        Ok(records)
    }
}

/// Where the audit chain key comes from.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ChainKeyArg {
    /// The audit key file (`[audit] key_file`).
    #[arg(long)]
    key: Option<PathBuf>,
    /// A vizor configuration: its `[audit] key_file`.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ChainKeyArg {
    fn load(&self) -> Result<ChainKey, Box<dyn std::error::Error>> {
        match (&self.key, &self.config) {
            (Some(k), _) => Ok(ChainKey::load(k)?),
            (None, Some(c)) => {
                let config = Config::load(c)?;
                Ok(ChainKey::load(&config.audit.key_file)?)
            }
            (None, None) => Err("--key or --config is required".into()),
        }
    }
}

/// One line of `vizor audit tail` for what a record shows.
fn tail_line(record: &serde_json::Value, shown: &crate::audit::follow::Shown) -> String {
    use crate::audit::follow::Shown;
    let ts = record["ts"].as_str().unwrap_or("-");
    match shown {
        Shown::Record => {
            let mut rest = record.clone();
            if let Some(m) = rest.as_object_mut() {
                for k in ["ts", "event", "seq", "chain", "v"] {
                    m.remove(k);
                }
            }
            format!("{ts} {} {rest}", record["event"].as_str().unwrap_or("?"))
        }
        Shown::Text {
            session,
            user,
            text,
        } => format!(
            "{ts} typed session {session}{}: {text:?}",
            user.as_deref()
                .map(|u| format!(" ({u})"))
                .unwrap_or_default()
        ),
    }
}

/// `vizor audit tail`.
fn tail(
    file: &std::path::Path,
    session: Option<u64>,
    lines: usize,
    follow: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{BufRead, Seek, Write};
    use std::os::unix::fs::MetadataExt;
    let mut f = crate::audit::follow::Follow::new(session);
    let open = |p: &std::path::Path| -> Result<(std::fs::File, u64), String> {
        let file = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let inode = file.metadata().map_err(|e| e.to_string())?.ino();
        Ok((file, inode))
    };
    let (file_handle, mut inode) = open(file)?;
    let mut reader = std::io::BufReader::new(file_handle);
    let mut out = std::io::stdout().lock();
    // What is there: through the follower (it learns who joined), the last lines shown.
    let mut last = std::collections::VecDeque::with_capacity(lines.min(10_000));
    let mut line = String::new();
    let mut partial = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        if !line.ends_with('\n') {
            // Mid-write: the rest comes with the follow.
            partial = std::mem::take(&mut line);
            break;
        }
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line.trim_end()) else {
            continue;
        };
        let runs = f.runs();
        let shown_now = f.record(&record);
        if session.is_some() && f.runs() != runs {
            // Another run of vizor: its session of that id is another session.
            last.clear();
        }
        for shown in shown_now {
            if lines > 0 {
                if last.len() == lines {
                    last.pop_front();
                }
                last.push_back(tail_line(&record, &shown));
            }
        }
    }
    for l in last {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    if !follow {
        return Ok(());
    }
    let mut rotated = false;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            if rotated {
                // The old file is read to its end: on to the new one.
                let (new, ino) = open(file)?;
                reader = std::io::BufReader::new(new);
                inode = ino;
                partial.clear();
                rotated = false;
                continue;
            }
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(m) = std::fs::metadata(file) {
                if m.ino() != inode {
                    // Rotated: the log was renamed and a new one started at its path.
                    // What the old file got since the last read comes first.
                    rotated = true;
                } else if m.len() < reader.stream_position()? {
                    // A failed write taken back: what stands is read on from its end.
                    reader.seek(std::io::SeekFrom::Start(m.len()))?;
                    partial.clear();
                }
            }
            continue;
        }
        partial.push_str(&line);
        if !partial.ends_with('\n') {
            continue;
        }
        let whole = std::mem::take(&mut partial);
        let Ok(record) = serde_json::from_str::<serde_json::Value>(whole.trim_end()) else {
            continue;
        };
        for shown in f.record(&record) {
            writeln!(out, "{}", tail_line(&record, &shown))?;
        }
        out.flush()?;
    }
}

fn audit(command: AuditCommand) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        AuditCommand::Tail {
            follow,
            session,
            lines,
            file,
        } => {
            eprintln!("vizor: not verified (vizor audit verify checks the chain)");
            tail(&file, session, lines, follow)
        }
        AuditCommand::Verify { key, files } => {
            let report = crate::audit::chain::verify(&key.load()?, &files)
                .map_err(|e| format!("reading the audit log: {e}"))?;
            for note in &report.notes {
                println!("note: {note}");
            }
            if let Some((file, line, why)) = &report.broken {
                return Err(format!(
                    "BROKEN at {file}:{line}: {why} ({} records before it verified)",
                    report.records
                )
                .into());
            }
            match &report.last {
                Some((seq, chain)) => println!(
                    "ok: {} records verified; the last is seq {seq} with chain {chain}",
                    report.records
                ),
                None => println!("ok: no records"),
            }
            Ok(())
        }
        AuditCommand::Sessions { key, files } => {
            let records = key.records(&files)?;
            println!(
                "{:>8}  {:<16} {:<24} {:<5} {:<24} {:>10} {:>6}  end",
                "session", "user", "domain", "kind", "start", "duration", "keys"
            );
            let all = crate::audit::review::sessions(&records);
            for s in &all {
                let duration = s
                    .duration_ms
                    .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:>8}  {:<16} {:<24} {:<5} {:<24} {:>10} {:>6}  {}",
                    s.label(&all),
                    s.user,
                    s.domain,
                    s.kind,
                    s.start,
                    duration,
                    s.keys,
                    s.end.as_deref().unwrap_or("(no end record)")
                );
            }
            Ok(())
        }
        AuditCommand::Text {
            key,
            session,
            files,
        } => {
            let records = key.records(&files)?;
            let all = crate::audit::review::sessions(&records);
            let found = crate::audit::review::find(&all, &session)?;
            print!("{}", crate::audit::review::text(&records, found));
            let mismatched = crate::audit::review::mismatches(&records, found);
            if mismatched > 0 {
                eprintln!(
                    "vizor: {mismatched} key event(s) of this session carried a keysym that the key \
                     the VM got does not produce on a US layout (\"mismatch\": true); the text \
                     follows the keys the VM got"
                );
            }
            Ok(())
        }
    }
}

fn init_logging(log: &crate::config::LogConfig) -> Result<(), Box<dyn std::error::Error>> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) => EnvFilter::try_new(f)?,
        Err(_) => EnvFilter::try_new(&log.level)
            .map_err(|e| format!("[log] level {:?}: {e}", log.level))?,
    };
    // Colours for a terminal only: a journal or a log file gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.format {
        crate::config::LogFormat::Json => builder.json().init(),
        crate::config::LogFormat::Human => builder.init(),
    }
    Ok(())
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Serve { config } => {
            let path = config;
            let config = Config::load(&path)?;
            init_logging(&config.log)?;
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.server.worker_threads {
                runtime.worker_threads(n);
            }
            runtime
                .enable_all()
                .build()?
                .block_on(crate::serve::serve(config, &path))
        }
        Command::Check { config } => {
            let user = nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| nix::unistd::getuid().to_string());
            println!("vizor check {} (as user {user})", config.display());
            let findings = crate::check::check(&config);
            for f in &findings {
                println!("{f}");
            }
            let failed = findings
                .iter()
                .filter(|f| matches!(f, crate::check::Finding::Fail(_)))
                .count();
            let warned = findings
                .iter()
                .filter(|f| matches!(f, crate::check::Finding::Warn(_)))
                .count();
            if failed > 0 {
                return Err(format!(
                    "{} has {failed} problem(s) that stop vizor serve",
                    config.display()
                )
                .into());
            }
            println!(
                "vizor check: {} is good{}",
                config.display(),
                match warned {
                    0 => String::new(),
                    n => format!(" ({n} warning(s))"),
                }
            );
            Ok(())
        }
        Command::Keygen { file } => {
            TokenKey::write_new(&file)?;
            eprintln!(
                "vizor: wrote a new key to {} (use it as [tokens] key_file or [audit] key_file, not both)",
                file.display()
            );
            Ok(())
        }
        Command::Token {
            config,
            domain,
            host,
            kind,
            ttl,
            user,
            client,
            view_only,
            clipboard,
            max_duration,
        } => {
            let policy = crate::token::Policy::asked(
                kind,
                view_only,
                clipboard,
                max_duration.map(Into::into),
            )?;
            let config = Config::load(&config)?;
            let ttl: Duration = ttl.map(Into::into).unwrap_or(config.tokens.ttl);
            crate::token::check_ttl(ttl)?;
            let key = TokenKey::load(&config.tokens.key_file)?;
            let user = user
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "cli".to_owned());
            // The token names the domain by UUID, on its host: libvirt says which
            // domain `domain` is.
            let (host, name, uuid) = crate::libvirt::hosts::identify_blocking(
                &config.libvirt.hosts(),
                host.as_deref(),
                &domain,
            )
            .map_err(|e| format!("cannot issue a token for domain {domain:?}: {e}"))?;
            let domain = name;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let grant = crate::token::Grant {
                host: &host,
                domain: &domain,
                uuid,
                kind,
                user: &user,
                client,
                ttl,
                role: crate::token::Role::Owner,
                joins: None,
                policy,
            };
            let Issued { token, claims } = key
                .issue(&grant, now)
                .map_err(|e| format!("cannot issue a token for domain {domain:?}: {e}"))?;
            eprintln!(
                "vizor: token {} for {kind} console of {domain:?} ({}{}), user {user:?}{}, valid {}",
                claims.token_id(),
                claims.uuid_string(),
                if host == crate::config::DEFAULT_HOST {
                    String::new()
                } else {
                    format!(" on host {host}")
                },
                client
                    .map(|ip| format!(", client {ip} only"))
                    .unwrap_or_default(),
                humantime::format_duration(ttl)
            );
            if policy != crate::token::Policy::default() {
                eprintln!(
                    "vizor: policy: {}clipboard {}{}",
                    if policy.view_only { "view only, " } else { "" },
                    policy.clipboard.as_str(),
                    policy
                        .max_duration
                        .map(|d| format!(", sessions end after {}", humantime::format_duration(d)))
                        .unwrap_or_default()
                );
            }
            println!("{token}");
            Ok(())
        }
        Command::Audit { command } => audit(command),
        Command::Replay {
            file,
            listen,
            speed,
            web_root,
            novnc,
        } => {
            if !(speed >= 0.0 && speed.is_finite()) {
                return Err(format!("--speed {speed}: a number of 0 or more").into());
            }
            let console = crate::config::ConsoleConfig {
                novnc,
                spice_html5: None,
                frame_ancestors: Vec::new(),
            };
            crate::console::check(&console)
                .map_err(|e| e.replace("[console] novnc =", "--novnc"))?;
            let title = format!(
                "Replay of {}",
                file.file_name().unwrap_or_default().to_string_lossy()
            );
            let recording = crate::recording::read(&file)?;
            init_logging(&crate::config::LogConfig::default())?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(crate::recording::replay::serve(
                    crate::recording::replay::Replay {
                        recording,
                        speed,
                        web_root,
                        console,
                        title,
                    },
                    listen,
                ))
        }
    }
}
