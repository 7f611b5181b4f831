//! A real Redis (Debian's `redis-server`) for the tests of replicas sharing state: on a
//! free loopback port, with a password, nothing saved to disk.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running redis-server; killed when dropped.
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its password.
    pub password: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Over TLS only (the test host's CA: `scripts/test-host.sh start` makes it), with
    /// client certificates demanded.
    tls: bool,
}

/// The test host's CA and certificates (127.0.0.1's server, vizor's client).
pub const PKI: &str = "/var/lib/vizor-test/pki";

impl Redis {
    /// Starts one and waits until it answers.
    pub fn start() -> Redis {
        Self::start_with(false)
    }

    /// Starts one that speaks TLS alone, demanding a client certificate of the test CA.
    pub fn start_tls() -> Redis {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let password = format!("rp-{}", super::free_port());
        super::run::secret("redis password", &password);
        let mut r = Redis {
            port: super::free_port(),
            password,
            dir,
            child: None,
            tls,
        };
        r.start_again();
        r
    }

    /// The `[state]` table of a vizor using it (its password in `redis.password`
    /// of that vizor's directory: see [`Redis::write_password`]).
    pub fn state_table(&self, replica: &str) -> String {
        let (scheme, tls) = match self.tls {
            false => ("redis", String::new()),
            true => (
                "rediss",
                format!(
                    "ca = \"{PKI}/ca-cert.pem\"\nclient_cert = \"{PKI}/client-cert.pem\"\nclient_key = \"{PKI}/client-key.pem\"\n"
                ),
            ),
        };
        format!(
            "[state]\nredis = \"{scheme}://127.0.0.1:{}/0\"\npassword_file = \"redis.password\"\nreplica = \"{replica}\"\ntimeout = \"1s\"\n{tls}",
            self.port
        )
    }

    /// Writes the password where [`Redis::state_table`] says.
    pub fn write_password(&self, dir: &std::path::Path) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("redis.password");
        std::fs::write(&path, format!("{}\n", self.password)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Stops it (SIGKILL): every connection to it drops.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (SIGCONT): what it holds is still there.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Starts it again on the same port (empty: it saves nothing).
    pub fn start_again(&mut self) {
        let conf = self.dir.path().join("redis.conf");
        std::fs::write(
            &conf,
            match self.tls {
                false => format!(
                    "port {}\nbind 127.0.0.1\nsave \"\"\nappendonly no\nrequirepass {}\ndir {}\n",
                    self.port,
                    self.password,
                    self.dir.path().display()
                ),
                true => format!(
                    "port 0\ntls-port {}\ntls-cert-file {PKI}/server-cert.pem\ntls-key-file {PKI}/server-key.pem\n\
                     tls-ca-cert-file {PKI}/ca-cert.pem\ntls-auth-clients yes\n\
                     bind 127.0.0.1 127.0.0.2\nsave \"\"\nappendonly no\nrequirepass {}\ndir {}\n",
                    self.port,
                    self.password,
                    self.dir.path().display()
                ),
            },
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it answers PING (redis-cli, its password in the environment).
    fn answers(&self) -> bool {
        let mut cli = Command::new("redis-cli");
        if self.tls {
            cli.args([
                "--tls",
                "--cacert",
                &format!("{PKI}/ca-cert.pem"),
                "--cert",
                &format!("{PKI}/client-cert.pem"),
                "--key",
                &format!("{PKI}/client-key.pem"),
            ]);
        }
        cli.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "ping"])
            .env("REDISCLI_AUTH", &self.password)
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
