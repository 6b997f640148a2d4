//! A streaming standby of the test cluster, for the routing tests: `pg_basebackup -R` from the
//! primary into a temp dir (as the `postgres` OS user when we are root), started on its own port,
//! stopped and removed on drop. Kept apart from `pgtenant::cluster`, which only knows primaries.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pgtenant::cluster::Cluster;

pub struct Standby {
    dir: Option<tempfile::TempDir>,
    bindir: PathBuf,
    run_as: Option<(u32, u32)>,
    /// The primary's superuser URL with this standby's port (psql checks).
    superuser_url: String,
    pub port: u16,
    running: bool,
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: getpwnam returns a pointer to static storage or null; the ids are copied out at once.
    unsafe {
        let pw = libc::getpwnam(c"postgres".as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn with_port(url: &str, from: u16, to: u16) -> String {
    url.replace(&format!("127.0.0.1:{from}/"), &format!("127.0.0.1:{to}/"))
}

impl Standby {
    /// Clones `primary` and starts the standby; returns once it is replaying.
    pub fn of(primary: &Cluster) -> Result<Standby, String> {
        let run_as = if unsafe { libc::geteuid() } == 0 { postgres_user() } else { None };
        let dir = tempfile::Builder::new().prefix("pgtenant-standby-").tempdir().map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let port = free_port();
        let mut s = Standby {
            bindir: primary.bindir().to_path_buf(),
            run_as,
            superuser_url: with_port(&primary.superuser_url("postgres"), primary.port(), port),
            port,
            running: false,
            dir: Some(dir),
        };
        let mut backup = s.command("pg_basebackup");
        backup.arg("-D").arg(s.data_dir()).args(["-R", "-X", "stream", "-c", "fast", "-d"]).arg(primary.superuser_url("postgres"));
        s.run(backup, "pg_basebackup")?;
        let conf = format!(
            "\nport = {port}\nunix_socket_directories = '{}'\nhot_standby = on\nlisten_addresses = '127.0.0.1'\n",
            s.root().display()
        );
        let auto = s.data_dir().join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).map_err(|e| e.to_string())?;
        text.push_str(&conf);
        std::fs::write(&auto, text).map_err(|e| e.to_string())?;
        s.start()?;
        Ok(s)
    }

    fn root(&self) -> PathBuf {
        self.dir.as_ref().map(|d| d.path().to_path_buf()).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.root().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid).env("HOME", self.root());
        }
        c.env_remove("PGDATA").env("LC_ALL", "C.UTF-8");
        c
    }

    fn run(&self, mut c: Command, what: &str) -> Result<String, String> {
        let out = c.output().map_err(|e| format!("{what}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{what} failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Starts the server (again).
    pub fn start(&mut self) -> Result<(), String> {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).arg("-l").arg(self.root().join("server.log")).args(["-w", "-t", "60", "start"]);
        self.run(c, "pg_ctl start (standby)")?;
        self.running = true;
        Ok(())
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&mut self) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).args(["-w", "-t", "60", "-m", "fast", "stop"]);
        self.run(c, "pg_ctl stop (standby)")?;
        self.running = false;
        Ok(())
    }

    /// Runs SQL on the standby as the superuser.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let url = self.superuser_url.replace("/postgres", &format!("/{db}"));
        let mut c = Command::new("psql");
        c.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d"]).arg(url).arg("-c").arg(sql);
        self.run(c, "psql (standby)")
    }

    /// Waits until the standby has replayed everything the primary has written so far.
    pub fn catch_up(&self, primary: &Cluster) -> Result<(), String> {
        let lsn = primary.psql("postgres", "SELECT pg_current_wal_lsn()").map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sql = format!("SELECT pg_is_in_recovery() AND pg_last_wal_replay_lsn() >= '{}'::pg_lsn", lsn.trim());
            if self.psql("postgres", &sql).as_deref() == Ok("t") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("standby did not replay up to {lsn} within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `postgres://user:password@127.0.0.1:<standby port>/db`.
    pub fn url(&self, primary: &Cluster, user: &str, password: &str, db: &str) -> String {
        with_port(&primary.url(user, password, db), primary.port(), self.port)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if self.running {
            let mut c = self.command("pg_ctl");
            c.arg("-D").arg(self.data_dir()).args(["-w", "-t", "60", "-m", "immediate", "stop"]);
            let _ = c.output();
        }
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}
