//! Tokens are bearer credentials (issue 19): a listener beyond loopback that does not require TLS
//! is warned about by `pgtenant check` and at start-up of the real binary; a loopback one is not.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

const WARNING: &str = "tokens are bearer credentials";

fn check(config: &std::path::Path) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_pgtenant")).args(["check", "--config"]).arg(config).output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure(out.status.success(), format!("check failed: {stdout}{}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(stdout)
}

/// Starts `pgtenant run`, returns its log up to the "pgtenant ready" line, and stops it.
fn startup_log(config: &std::path::Path) -> Result<String, String> {
    let (mut child, rx) = spawn_binary(config)?;
    let mut log = String::new();
    let result = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("pgtenant ready") {
                    break Ok(log);
                }
            }
            Err(_) => break Err(format!("binary did not start:\n{log}")),
        }
    };
    // SAFETY: signalling our own child
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

pub async fn cleartext_listeners_are_warned(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("pgtenant.toml");
    let text = config_text(env, "", "");
    for (listen, warned) in [("127.0.0.1:0", false), ("0.0.0.0:0", true)] {
        std::fs::write(&file, text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{listen}\""))).map_err(|e| e.to_string())?;
        let out = check(&file)?;
        ensure(out.contains(WARNING) == warned, format!("pgtenant check, listen {listen}: warned {}, want {warned}:\n{out}", !warned))?;
        let log = tokio::task::block_in_place(|| startup_log(&file))?;
        ensure(log.contains(WARNING) == warned, format!("start-up, listen {listen}: warned {}, want {warned}:\n{log}", !warned))?;
    }
    Ok(())
}
