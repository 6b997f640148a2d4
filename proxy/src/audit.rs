//! The audit log: one JSON object per line for logins, refused statements and every statement of a
//! trusted bypass session (`[audit] path`, or `-` for standard output).
//!
//! Each record is written with a single `write` to a file opened for appending, so lines from many
//! sessions never interleave and a crash loses at most the record being written. The file is
//! reopened on SIGHUP / `POST /reload`, which is all logrotate needs (move the file, then signal).
//! Records carry statement fingerprints (`sql::fingerprint`), never literal values or tokens.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::config::AuditConfig;

enum Sink {
    Off,
    Stdout,
    File(std::fs::File),
}

/// The record could not be written (the reason went to the pgtenant log).
#[derive(Debug)]
pub struct NotRecorded;

pub struct AuditLog {
    path: Mutex<Option<PathBuf>>,
    sink: Mutex<Sink>,
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
    pub fn open(cfg: &AuditConfig) -> Result<AuditLog, String> {
        Ok(AuditLog { sink: Mutex::new(open_sink(&cfg.path)?), path: Mutex::new(cfg.path.clone()) })
    }

    pub fn enabled(&self) -> bool {
        self.path.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Reopens the file (after logrotate moved it), or switches to a new `audit.path`. On failure
    /// the old file stays in use.
    pub fn reopen(&self, cfg: &AuditConfig) -> Result<(), String> {
        let sink = open_sink(&cfg.path)?;
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = sink;
        *self.path.lock().unwrap_or_else(|p| p.into_inner()) = cfg.path.clone();
        Ok(())
    }

    /// Writes one record: `{"ts": …, "event": event, …fields}`. Errors are counted and logged
    /// (without the record); the caller decides whether the action may go on without it.
    pub fn record(&self, event: &str, fields: Value) -> Result<(), NotRecorded> {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*sink, Sink::Off) {
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
        let written = match &mut *sink {
            Sink::Off => Ok(()),
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
        };
        let ok = written.is_ok();
        metrics::counter!(crate::metrics::AUDIT_RECORDS, "result" => if ok { "ok" } else { "error" }).increment(1);
        written.map_err(|e| {
            tracing::error!(error = %e, event, "cannot write the audit log");
            NotRecorded
        })
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

    #[test]
    fn records_are_lines_and_reopen_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()) };
        let log = AuditLog::open(&cfg).unwrap();
        log.record("login", serde_json::json!({ "tenant": "1" })).unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        log.record("login", serde_json::json!({ "tenant": "2" })).unwrap(); // still the moved file
        log.reopen(&cfg).unwrap();
        log.record("login", serde_json::json!({ "tenant": "3" })).unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!((old.lines().count(), new.lines().count()), (2, 1));
        let v: Value = serde_json::from_str(new.trim()).unwrap();
        assert_eq!((v["event"].as_str(), v["tenant"].as_str()), (Some("login"), Some("3")));
        // off: nothing written, never an error
        AuditLog::open(&AuditConfig::default()).unwrap().record("login", Value::Null).unwrap();
    }
}
