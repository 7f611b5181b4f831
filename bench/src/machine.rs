//! What the numbers were measured on: the machine, what else was busy on it, and the
//! versions of everything compared.

use serde::Serialize;
use std::path::Path;
use std::process::Command;

/// The machine and the versions.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// /proc/cpuinfo's model name.
    pub cpu_model: String,
    /// The kernel release.
    pub kernel: String,
    /// MemTotal, MiB.
    pub memory_mib: u64,
    /// /proc/loadavg at the start.
    pub loadavg_start: String,
    /// /proc/loadavg at the end.
    pub loadavg_end: String,
    /// The busiest processes at the start (`ps`): a shared machine's other load.
    pub busy_at_start: Vec<String>,
    /// Versions.
    pub versions: Versions,
}

/// Versions of what was compared.
#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    /// `git rev-parse HEAD` of this repository, `+dirty` with uncommitted changes.
    pub vizor_git_rev: String,
    /// Debian's websockify package.
    pub websockify: String,
    /// `websocat --version`.
    pub websocat: String,
    /// `rustc --version`.
    pub rustc: String,
}

/// The first line of a command's standard output, or what went wrong.
fn run(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        Ok(o) => format!("unknown ({program} exited {})", o.status),
        Err(e) => format!("unknown ({program}: {e})"),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The load average now.
pub fn loadavg() -> String {
    read("/proc/loadavg")
}

impl Machine {
    /// Reads the machine; `repo` is this repository, `websocat` the program compared.
    pub fn read(repo: &Path, websocat: &Path) -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = proc_number(&read("/proc/meminfo"), "MemTotal:").map_or(0, |k| k / 1024);
        let repo_s = repo.to_string_lossy().into_owned();
        let mut rev = run("git", &["-C", &repo_s, "rev-parse", "HEAD"]);
        let dirty = Command::new("git")
            .args([
                "-C",
                &repo_s,
                "status",
                "--porcelain",
                "--untracked-files=no",
            ])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            rev.push_str("+dirty");
        }
        let websockify = match run("dpkg-query", &["-W", "-f=${Version}", "websockify"]) {
            v if v.is_empty() || v.starts_with("unknown") => run(
                "python3",
                &["-c", "import websockify; print(websockify.__version__)"],
            ),
            v => format!("{v} (Debian)"),
        };
        let busy_at_start = Command::new("ps")
            .args(["-eo", "pcpu,ni,comm", "--sort=-pcpu", "--no-headers"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .take(4)
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .collect()
            })
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease"),
            memory_mib,
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            busy_at_start,
            versions: Versions {
                vizor_git_rev: rev,
                websockify,
                websocat: run(&websocat.to_string_lossy(), &["--version"]),
                rustc: run("rustc", &["--version"]),
            },
        }
    }
}

/// The number after `key` in a /proc text, such as 24105 for "MemTotal:" in
/// "MemTotal:   24105 kB", or the soft limit for "Max open files" in /proc/PID/limits.
pub fn proc_number(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::proc_number;

    #[test]
    fn proc_numbers_are_the_first_figure_after_the_key() {
        let meminfo =
            "MemTotal:       24683820 kB\nMemFree:         1234 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(proc_number(meminfo, "MemTotal:"), Some(24_683_820));
        assert_eq!(proc_number(meminfo, "MemAvailable:"), Some(20_000_000));
        assert_eq!(proc_number(meminfo, "SwapTotal:"), None);
        let limits =
            "Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(proc_number(limits, "Max open files"), Some(20_000));
        assert_eq!(proc_number(limits, "Max cpu time"), None);
    }
}
