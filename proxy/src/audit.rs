//! The audit log: one JSON object per line for logins, refused statements and every statement of a
//! trusted bypass session (`[audit] path`, or `-` for standard output).
//!
//! Records are written by a dedicated writer thread, never on the async runtime's threads: a
//! session hands its record over through a bounded queue and waits (at most
//! `audit.write_timeout_ms`) for the writer to acknowledge it, so a bypass statement runs only once
//! its record is in the file, and a slow or stuck disk slows the sessions that write records
//! without blocking anyone else's. The writer writes records in the order they were accepted, each
//! with a single `write` to a file opened for appending, so lines never interleave; acknowledged
//! means handed to the operating system, or with `audit.fsync = true` also flushed to the disk
//! (`fdatasync`) first. The file is reopened on SIGHUP / `POST /reload`, which is all logrotate needs
//! (move the file, then signal). Records carry statement fingerprints (`sql::fingerprint`), never
//! literal values or tokens.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::config::AuditConfig;

/// Records waiting for the writer at most; a session whose record finds the queue full waits for
/// room (within `audit.write_timeout_ms`).
const QUEUE: usize = 4096;

enum Sink {
    Off,
    Stdout,
    File(std::fs::File),
}

/// Where the writer writes, and how.
struct Out {
    sink: Sink,
    fsync: bool,
}

/// One record for the writer, and where to say whether it was written.
struct Job {
    line: String,
    event: String,
    done: oneshot::Sender<bool>,
}

/// The record could not be written (the reason went to the pgtenant log).
#[derive(Debug)]
pub struct NotRecorded;

pub struct AuditLog {
    path: Mutex<Option<PathBuf>>,
    /// Records are wanted (`audit.path` is set).
    on: AtomicBool,
    /// A reopened sink for the writer to take before its next record.
    next: Arc<Mutex<Option<Out>>>,
    queue: mpsc::Sender<Job>,
    /// `audit.write_timeout_ms`.
    timeout: Mutex<Duration>,
}

fn open_sink(path: &Option<PathBuf>) -> Result<Sink, String> {
    use std::os::unix::fs::OpenOptionsExt;
    match path {
        None => Ok(Sink::Off),
        Some(p) if p.as_os_str() == "-" => Ok(Sink::Stdout),
        Some(p) => std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(p)
            .map(Sink::File)
            .map_err(|e| format!("audit.path {}: {e}", p.display())),
    }
}

impl AuditLog {
    /// Opens the sink and starts the writer thread (it ends when the log is dropped).
    pub fn open(cfg: &AuditConfig) -> Result<AuditLog, String> {
        let mut out = Out { sink: open_sink(&cfg.path)?, fsync: cfg.fsync };
        let next: Arc<Mutex<Option<Out>>> = Arc::default();
        let (queue, mut jobs) = mpsc::channel::<Job>(QUEUE);
        let reopened = next.clone();
        std::thread::Builder::new()
            .name("pgtenant-audit".into())
            .spawn(move || {
                while let Some(job) = jobs.blocking_recv() {
                    if let Some(new) = reopened.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        out = new;
                    }
                    let written = out.write(job.line.as_bytes());
                    let ok = written.is_ok();
                    metrics::counter!(crate::metrics::AUDIT_RECORDS, "result" => if ok { "ok" } else { "error" }).increment(1);
                    if let Err(e) = written {
                        tracing::error!(error = %e, event = %job.event, "cannot write the audit log");
                    }
                    let _ = job.done.send(ok);
                }
            })
            .map_err(|e| format!("cannot start the audit log writer: {e}"))?;
        Ok(AuditLog {
            on: AtomicBool::new(cfg.path.is_some()),
            path: Mutex::new(cfg.path.clone()),
            next,
            queue,
            timeout: Mutex::new(Duration::from_millis(cfg.write_timeout_ms)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.path.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Reopens the file (after logrotate moved it), or switches to a new `audit.path`; the writer
    /// uses it from its next record on (records it already took go to the old file). On failure
    /// the old file stays in use.
    pub fn reopen(&self, cfg: &AuditConfig) -> Result<(), String> {
        let sink = open_sink(&cfg.path)?;
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(Out { sink, fsync: cfg.fsync });
        *self.path.lock().unwrap_or_else(|p| p.into_inner()) = cfg.path.clone();
        *self.timeout.lock().unwrap_or_else(|p| p.into_inner()) = Duration::from_millis(cfg.write_timeout_ms);
        self.on.store(cfg.path.is_some(), Ordering::Release);
        Ok(())
    }

    /// Writes one record, `{"ts": …, "event": event, …fields}`, and returns once the writer has
    /// written it (see the module doc for what that guarantees). A record the writer could not
    /// write, or did not acknowledge within `audit.write_timeout_ms`, is an error (counted and
    /// logged, without the record); the caller decides whether the action may go on without it.
    pub async fn record(&self, event: &str, fields: Value) -> Result<(), NotRecorded> {
        if !self.on.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut obj = Map::new();
        obj.insert("ts".into(), Value::String(timestamp(std::time::SystemTime::now())));
        obj.insert("event".into(), Value::String(event.into()));
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        let mut line = Value::Object(obj).to_string();
        line.push('\n');
        let (done, written) = oneshot::channel();
        let job = Job { line, event: event.to_string(), done };
        let limit = *self.timeout.lock().unwrap_or_else(|p| p.into_inner());
        let acknowledged = tokio::time::timeout(limit, async {
            self.queue.send(job).await.ok()?;
            written.await.ok()
        })
        .await;
        match acknowledged {
            Ok(Some(true)) => Ok(()),
            Ok(Some(false)) => Err(NotRecorded), // counted and logged by the writer
            Ok(None) | Err(_) => {
                metrics::counter!(crate::metrics::AUDIT_RECORDS, "result" => "timeout").increment(1);
                tracing::error!(event, timeout_ms = limit.as_millis() as u64, "the audit log writer did not take the record in time");
                Err(NotRecorded)
            }
        }
    }
}

impl Out {
    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match &mut self.sink {
            Sink::Off => Ok(()),
            Sink::Stdout => std::io::stdout().lock().write_all(line),
            Sink::File(f) => {
                f.write_all(line)?;
                if self.fsync {
                    f.sync_data()?;
                }
                Ok(())
            }
        }
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-26T03:40:00.123Z`.
pub fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_664_400_123);
        assert_eq!(timestamp(t), "2026-11-26T03:40:00.123Z");
        assert_eq!(timestamp(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&timestamp(leap)[..10], "2000-02-29");
    }

    #[tokio::test]
    async fn records_are_lines_and_reopen_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()), fsync: true, ..Default::default() };
        let log = AuditLog::open(&cfg).unwrap();
        log.record("login", serde_json::json!({ "tenant": "1" })).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        log.record("login", serde_json::json!({ "tenant": "2" })).await.unwrap(); // still the moved file
        log.reopen(&cfg).unwrap();
        log.record("login", serde_json::json!({ "tenant": "3" })).await.unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!((old.lines().count(), new.lines().count()), (2, 1));
        let v: Value = serde_json::from_str(new.trim()).unwrap();
        assert_eq!((v["event"].as_str(), v["tenant"].as_str()), (Some("login"), Some("3")));
        // off: nothing written, never an error
        AuditLog::open(&AuditConfig::default()).unwrap().record("login", Value::Null).await.unwrap();
    }

    /// The record is acknowledged only once written: a full disk is an error, not a silent loss,
    /// and many sessions writing at once lose nothing and never interleave lines.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_means_written() {
        let full = AuditLog::open(&AuditConfig { path: Some("/dev/full".into()), ..Default::default() }).unwrap();
        assert!(full.record("bypass_statement", serde_json::json!({})).await.is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = Arc::new(AuditLog::open(&AuditConfig { path: Some(path.clone()), ..Default::default() }).unwrap());
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..1000 {
                        log.record("x", serde_json::json!({ "t": t, "i": i, "pad": "p".repeat(i % 300) })).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 8000);
        assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
    }
}
