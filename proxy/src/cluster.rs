//! A throwaway Postgres cluster: initdb into a temp dir, start on a free port (TCP on 127.0.0.1 and
//! a Unix socket in the temp dir, SCRAM everywhere), and remove everything on drop.
//!
//! One implementation serves the integration tests, the benchmarks and `pgtenant demo`. Postgres
//! refuses to run as root, so when we are root the server runs as the `postgres` OS user.
//!
//! For failover tests a running cluster can get a streaming standby ([`Cluster::start_standby`]:
//! `pg_basebackup -R`, same binaries, its own temp dir and port), made synchronous with
//! [`Cluster::add_conf`], then the primary stopped ([`Cluster::stop_with`]) and the standby
//! promoted ([`Cluster::promote`]) — real replication and promotion, nothing simulated.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The reference multi-tenant schema with RLS (owner role, restricted `app_user`, FORCE RLS).
pub const RLS_FIXTURE_SQL: &str = include_str!("../../tests/fixtures/rls.sql");
/// Its policies in the signed-context style (`pgtenant.setting(…)`), applied on top of it after the
/// `pgtenant install-sql` script.
pub const RLS_SIGNED_FIXTURE_SQL: &str = include_str!("../../tests/fixtures/rls-signed.sql");

#[derive(Debug)]
pub struct ClusterError(pub String);

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClusterError {}

fn err(m: impl Into<String>) -> ClusterError {
    ClusterError(m.into())
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// TCP port; None picks a free one.
    pub port: Option<u16>,
    pub database: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { port: None, database: "app".into() }
    }
}

pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    password: String,
    database: String,
    /// (uid, gid) of the `postgres` user when we run as root.
    run_as: Option<(u32, u32)>,
    running: bool,
    /// Settings after the harness's own (`add_conf`; a standby's `primary_conninfo`).
    extra_conf: String,
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy the ids out at once.
    unsafe {
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

fn free_port() -> Result<u16, ClusterError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| err(format!("cannot find a free port: {e}")))?;
    Ok(l.local_addr().map_err(|e| err(e.to_string()))?.port())
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl Cluster {
    /// Finds the server binaries: `pg_config --bindir`, the newest /usr/lib/postgresql/*/bin, PATH.
    pub fn find_bindir() -> Result<PathBuf, ClusterError> {
        let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_initdb(&d) {
                return Ok(d);
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                has_initdb(&bin).then_some((v, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Ok(bin);
        }
        if let Some(path) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&path) {
                if has_initdb(&d) {
                    return Ok(d);
                }
            }
        }
        Err(err(
            "Postgres server binaries not found (looked in pg_config --bindir, /usr/lib/postgresql/*/bin, PATH); \
             install them with: apt-get install postgresql",
        ))
    }

    pub fn start() -> Result<Cluster, ClusterError> {
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let password: String = {
            use rand::Rng;
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect()
        };
        let mut cluster = Self::empty(password, opts.database.clone())?;
        cluster.init()?;
        cluster.start_on(opts.port)?;
        if cluster.database != "postgres" {
            cluster.psql("postgres", &format!("CREATE DATABASE \"{}\"", cluster.database))?;
        }
        Ok(cluster)
    }

    /// A cluster with a fresh temp dir and nothing in it yet.
    fn empty(password: String, database: String) -> Result<Cluster, ClusterError> {
        let bindir = Self::find_bindir()?;
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user().ok_or_else(|| err("running as root but there is no `postgres` user to run the server as"))?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("pgtenant-pg-")
            .tempdir()
            .map_err(|e| err(format!("cannot create a temp dir: {e}")))?;
        let root = dir.path().to_path_buf();
        if let Some((uid, gid)) = run_as {
            chown_recursive(&root, uid, gid).map_err(|e| err(format!("chown temp dir: {e}")))?;
        }
        Ok(Cluster { dir: Some(dir), root, bindir, port: 0, password, database, run_as, running: false, extra_conf: String::new() })
    }

    /// Starts the server on `port`, or on a free port (a few tries: another process may take it).
    fn start_on(&mut self, port: Option<u16>) -> Result<(), ClusterError> {
        let mut last = None;
        for _ in 0..5 {
            self.port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            match self.start_server() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            if port.is_some() {
                break;
            }
        }
        Err(last.unwrap_or_else(|| err("server did not start")))
    }

    /// A streaming standby of this running cluster: `pg_basebackup -R` (WAL streamed during the
    /// copy) into a temp dir of its own, started on a free port. It has the same roles, password
    /// and data, and follows this cluster until [`Cluster::promote`].
    pub fn start_standby(&self) -> Result<Cluster, ClusterError> {
        let mut standby = Self::empty(self.password.clone(), self.database.clone())?;
        let mut backup = self.command("pg_basebackup");
        backup
            .arg("-D")
            .arg(standby.data_dir())
            .args(["-R", "-X", "stream", "--checkpoint=fast", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .env("PGPASSWORD", &self.password)
            .env("HOME", &standby.root);
        Self::run(backup, "pg_basebackup")?;
        // keep what -R wrote (how to reach the primary); the harness rewrites the rest of the file
        let auto = std::fs::read_to_string(standby.data_dir().join("postgresql.auto.conf")).map_err(|e| err(e.to_string()))?;
        standby.extra_conf = auto.lines().filter(|l| l.starts_with("primary_conninfo")).map(|l| format!("{l}\n")).collect();
        if standby.extra_conf.is_empty() {
            return Err(err("pg_basebackup -R wrote no primary_conninfo"));
        }
        standby.start_on(None)?;
        Ok(standby)
    }

    /// Adds settings (postgresql.conf lines) after the harness's own and reloads a running server;
    /// they survive restarts. E.g. `synchronous_standby_names = '*'`.
    pub fn add_conf(&mut self, lines: &str) -> Result<(), ClusterError> {
        self.extra_conf.push_str(lines);
        self.extra_conf.push('\n');
        self.write_conf()?;
        if self.running {
            self.psql("postgres", "SELECT pg_reload_conf()")?;
        }
        Ok(())
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&mut self) -> Result<(), ClusterError> {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).args(["-w", "-t", "60", "promote"]);
        Self::run(c, "pg_ctl promote").map(|_| ())
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub fn in_recovery(&self) -> Result<bool, ClusterError> {
        Ok(self.psql("postgres", "SELECT pg_is_in_recovery()")?.trim() == "t")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid).env("HOME", &self.root);
        }
        c.env_remove("PGDATA").env("LC_ALL", "C.UTF-8");
        c
    }

    fn run(mut cmd: Command, what: &str) -> Result<Output, ClusterError> {
        let out = cmd.output().map_err(|e| err(format!("{what}: cannot run: {e}")))?;
        if !out.status.success() {
            return Err(err(format!("{what} failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout))));
        }
        Ok(out)
    }

    fn init(&mut self) -> Result<(), ClusterError> {
        let pwfile = self.root.join("pwfile");
        std::fs::write(&pwfile, &self.password).map_err(|e| err(e.to_string()))?;
        if let Some((uid, gid)) = self.run_as {
            chown_recursive(&pwfile, uid, gid).map_err(|e| err(format!("chown temp dir: {e}")))?;
        }
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "-N", "--pwfile"])
            .arg(&pwfile);
        Self::run(initdb, "initdb")?;
        let _ = std::fs::remove_file(&pwfile);
        Ok(())
    }

    /// The harness's settings, then `extra_conf`, as postgresql.auto.conf.
    fn write_conf(&self) -> Result<(), ClusterError> {
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 300\nmax_prepared_transactions = 8\n\
             shared_buffers = 32MB\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n{}",
            self.port,
            self.root.display(),
            self.extra_conf
        );
        let auto = self.data_dir().join("postgresql.auto.conf");
        std::fs::write(&auto, conf).map_err(|e| err(e.to_string()))?;
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(&auto, Some(uid), Some(gid));
        }
        Ok(())
    }

    fn start_server(&mut self) -> Result<(), ClusterError> {
        self.write_conf()?;
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl.arg("-D").arg(self.data_dir()).arg("-l").arg(self.log_file()).args(["-w", "-t", "60", "start"]);
        match Self::run(pg_ctl, "pg_ctl start") {
            Ok(_) => {
                self.running = true;
                Ok(())
            }
            Err(e) => Err(err(format!("{e}\nserver log:\n{}", self.log_tail(20)))),
        }
    }

    fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            utf8_percent_encode(user, NON_ALPHANUMERIC),
            utf8_percent_encode(password, NON_ALPHANUMERIC),
            self.port,
            db
        )
    }

    pub fn superuser_url(&self, db: &str) -> String {
        self.url("postgres", &self.password, db)
    }

    fn psql_cmd(&self, db: &str) -> Command {
        let mut c = Command::new("psql");
        c.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .env("PGPASSWORD", &self.password)
            .env_remove("PGSERVICE");
        c
    }

    /// Runs SQL as the superuser and returns psql's output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let mut c = self.psql_cmd(db);
        c.arg("-c").arg(sql);
        let out = Self::run(c, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a SQL file as the superuser.
    pub fn psql_file(&self, db: &str, path: &Path) -> Result<String, ClusterError> {
        let mut c = self.psql_cmd(db);
        c.arg("-f").arg(path);
        let out = Self::run(c, "psql")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs SQL as the superuser, handed to psql on standard input: it is never on disk nor in the
    /// process list (`pgtenant install-sql` output carries the signing key).
    pub fn psql_stdin(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        use std::io::Write;
        let mut c = self.psql_cmd(db);
        c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().map_err(|e| err(format!("psql: cannot run: {e}")))?;
        let written = child.stdin.take().map(|mut stdin| stdin.write_all(sql.as_bytes()));
        let out = child.wait_with_output().map_err(|e| err(format!("psql: {e}")))?;
        if !out.status.success() || !matches!(written, Some(Ok(()))) {
            return Err(err(format!("psql failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads the RLS fixture into the cluster's database.
    pub fn load_rls_fixture(&self) -> Result<(), ClusterError> {
        let path = self.root.join("rls.sql");
        std::fs::write(&path, RLS_FIXTURE_SQL).map_err(|e| err(e.to_string()))?;
        self.psql_file(&self.database, &path).map(|_| ())
    }

    /// Installs the signed context (`install_sql`: the output of `pgtenant install-sql`) and
    /// switches the loaded RLS fixture to signed-context policies.
    pub fn load_signed_rls_fixture(&self, install_sql: &str) -> Result<(), ClusterError> {
        self.psql_stdin(&self.database, install_sql)?;
        self.psql_stdin(&self.database, RLS_SIGNED_FIXTURE_SQL).map(|_| ())
    }

    /// Stops the server (fast shutdown); idempotent.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        self.pg_ctl_stop("fast")
    }

    /// Stops the server with `pg_ctl stop -m immediate` (a crash: no shutdown checkpoint, clients
    /// cut off at once) or `-m fast`; idempotent.
    pub fn stop_with(&mut self, immediate: bool) -> Result<(), ClusterError> {
        self.pg_ctl_stop(if immediate { "immediate" } else { "fast" })
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).args(["-w", "-t", "60", "-m", mode, "stop"]);
        Self::run(c, "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Stops the server but keeps the data directory on disk (for `pgtenant demo --keep`); returns
    /// its path.
    pub fn keep(mut self) -> PathBuf {
        let _ = self.pg_ctl_stop("fast");
        let root = match self.dir.take() {
            Some(d) => d.keep(),
            None => self.root.clone(),
        };
        root.join("data")
    }

    /// Restarts on the same port (`immediate` simulates a crash).
    pub fn restart(&mut self, immediate: bool) -> Result<(), ClusterError> {
        self.pg_ctl_stop(if immediate { "immediate" } else { "fast" })?;
        self.start_server()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_loads_fixture_and_cleans_up() {
        let cluster = Cluster::start().expect("cluster starts");
        cluster.load_rls_fixture().unwrap();
        let data = cluster.data_dir();
        let as_app = |sql: &str| {
            let out = Command::new("psql")
                .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-U", "app_user", "-d", "app", "-p"])
                .arg(cluster.port().to_string())
                .args(["-c", sql])
                .env("PGPASSWORD", "app-secret")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(as_app("select count(*) from orders"), "0");
        assert_eq!(as_app("set app.tenant_id = '1'; select count(*) from orders"), "100");
        drop(cluster);
        assert!(!data.exists(), "data dir left behind");
        let ps = Command::new("pgrep").arg("-f").arg(data.to_string_lossy().as_ref()).output().unwrap();
        assert!(ps.stdout.is_empty(), "postgres still running");
    }

    #[test]
    fn synchronous_standby_follows_then_takes_over() {
        let mut primary = Cluster::start().expect("cluster starts");
        primary.psql("app", "CREATE TABLE t (n int); INSERT INTO t VALUES (1)").unwrap();
        let mut standby = primary.start_standby().expect("standby starts");
        primary.add_conf("synchronous_standby_names = '*'\nsynchronous_commit = on").unwrap();
        assert!(standby.in_recovery().unwrap() && !primary.in_recovery().unwrap());
        // acknowledged once the standby has it: no waiting for replay needed after promotion
        primary.psql("app", "INSERT INTO t VALUES (2)").unwrap();
        let sync = primary.psql("postgres", "SELECT sync_state FROM pg_stat_replication").unwrap();
        assert_eq!(sync.trim(), "sync");
        primary.stop_with(true).unwrap();
        standby.promote().unwrap();
        assert!(!standby.in_recovery().unwrap());
        assert_eq!(standby.psql("app", "INSERT INTO t VALUES (3); SELECT sum(n) FROM t").unwrap().trim(), "6");
    }
}
