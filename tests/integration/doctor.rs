//! `pgtenant doctor` checks every server of the config (issue: multi-host and routed configs): each
//! host of a multi-host `backend.url`, each read replica, each `[[clusters]]` entry. A problem on
//! one server only is reported for that server, named by host and cluster; a hot standby gets
//! every check without an error. Real servers: the suite's cluster, a streaming standby of it, and
//! a second independent cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use pgtenant::cluster::Cluster;
use pgtenant::doctor::{Checked, Report};

use crate::common::*;

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

fn url(c: &Cluster) -> String {
    c.url("app_user", "app-secret", "app")
}

fn at(c: &Cluster) -> String {
    format!("127.0.0.1:{}", c.port())
}

async fn report(text: &str) -> Result<Report, String> {
    let cfg = pgtenant::config::Config::from_toml(text, &|_| None).map_err(e)?;
    pgtenant::doctor::report(&cfg, None, pgtenant::install_sql::DEFAULT_SCHEMA).await
}

/// `check:object` of the findings, by `(cluster, host)`.
fn by_server(report: &Report) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for f in &report.findings {
        out.entry((f.cluster.clone(), f.host.clone())).or_default().insert(format!("{}:{}", f.check, f.object));
    }
    out
}

pub async fn doctor_checks_every_server(env: &Env) -> TestResult {
    let standby = env.cluster.start_standby().map_err(e)?;
    let eu = second_cluster()?;
    // a problem on eu only: a table the restricted role reads without row-level security
    eu.psql("app", "SET ROLE app_owner; CREATE TABLE notes (x int); GRANT SELECT ON notes TO app_user").map_err(e)?;
    let notes = "table_without_rls:public.notes".to_string();
    // what the suite's cluster alone shows (the fixture's findings)
    let plain = report(&config_text(env, "", "")).await?;
    let fixture = by_server(&plain).into_values().next().ok_or("no findings on the fixture")?;
    ensure(!fixture.contains(&notes), "the suite's cluster has the notes table")?;

    // a read replica and a second cluster
    let routed = config_text(env, &format!("replicas = [\"{}\"]", url(&standby)), &format!("[[clusters]]\nname = \"eu\"\nurl = \"{}\"\n", url(&eu)));
    let r = report(&routed).await?;
    let server = |cluster: &str, kind: &'static str, c: &Cluster, standby: bool| Checked { cluster: cluster.into(), kind, host: at(c), standby };
    let checked = vec![server("default", "primary", &env.cluster, false), server("default", "replica", &standby, true), server("eu", "primary", &eu, false)];
    ensure(r.checked == checked, format!("servers checked: {:?}", r.checked))?;
    let found = by_server(&r);
    let with_notes: BTreeSet<String> = fixture.iter().cloned().chain([notes.clone()]).collect();
    let expected = BTreeMap::from([
        (("default".to_string(), at(&env.cluster)), fixture.clone()),
        (("default".to_string(), at(&standby)), fixture.clone()),
        (("eu".to_string(), at(&eu)), with_notes.clone()),
    ]);
    ensure(found == expected, format!("findings by server: {found:?}"))?;

    // a multi-host backend.url: the second host is checked too, and only it has the problem
    let two_hosts = config_text(env, "", "").replace(&url(&env.cluster), &format!("postgres://app_user:app-secret@{},{}/app", at(&env.cluster), at(&eu)));
    let found = by_server(&report(&two_hosts).await?);
    let expected = BTreeMap::from([(("default".to_string(), at(&env.cluster)), fixture.clone()), (("default".to_string(), at(&eu)), with_notes)]);
    ensure(found == expected, format!("multi-host findings by server: {found:?}"))?;

    // the binary: JSON findings carry host and cluster; the text report names the servers
    let dir = tempfile::tempdir().map_err(e)?;
    let file = dir.path().join("pgtenant.toml");
    std::fs::write(&file, &routed).map_err(e)?;
    let bin = env!("CARGO_BIN_EXE_pgtenant");
    let out = Command::new(bin).args(["doctor", "--json", "--config"]).arg(&file).output().map_err(e)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|er| format!("doctor --json: {er}"))?;
    let eu_notes: Vec<&serde_json::Value> = json.as_array().into_iter().flatten().filter(|f| f["object"] == "public.notes").collect();
    ensure(
        out.status.code() == Some(1) && eu_notes.len() == 1 && eu_notes[0]["host"] == at(&eu).as_str() && eu_notes[0]["cluster"] == "eu",
        format!("doctor --json exit {:?}: {eu_notes:?}", out.status.code()),
    )?;
    let out = Command::new(bin).args(["doctor", "--config"]).arg(&file).output().map_err(e)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(
        text.contains(&format!("checked cluster default, replica host {} (standby: in recovery)", at(&standby))) && text.contains(&format!("-- cluster eu, host {}", at(&eu))),
        format!("doctor text report: {text}"),
    )?;

    // a standby gets every check, the signing probe included: with the signed context installed on
    // eu, its standby shows what eu shows, and the probe verifies on both
    let signed = config_text(env, "", "signing_key = \"c2lnbmluZy1rZXktZm9yLWRvY3Rvci10ZXN0cy0wMTIzNDU2Nzg5\"\nsigning_kid = \"k1\"");
    let cfg = pgtenant::config::Config::from_toml(&signed, &|_| None).map_err(e)?;
    eu.load_signed_rls_fixture(&pgtenant::install_sql::script(&cfg, pgtenant::install_sql::DEFAULT_SCHEMA)?).map_err(e)?;
    let eu_standby = eu.start_standby().map_err(e)?;
    let signed = signed.replace(&url(&env.cluster), &url(&eu)).replace("[jwt]", &format!("replicas = [\"{}\"]\n[jwt]", url(&eu_standby)));
    let r = report(&signed).await?;
    ensure(r.checked.iter().map(|c| c.standby).collect::<Vec<_>>() == [false, true], format!("signed servers: {:?}", r.checked))?;
    let found = by_server(&r);
    let (primary, replica) = (found.get(&("default".to_string(), at(&eu))), found.get(&("default".to_string(), at(&eu_standby))));
    ensure(
        primary.is_some() && primary == replica && primary.is_some_and(|f| f.contains(&notes) && !f.iter().any(|c| c.starts_with("signing_"))),
        format!("signed findings by server: {found:?}"),
    )?;

    // an unreachable server fails the run, named
    drop(standby);
    let err = report(&routed).await.err().ok_or("the doctor ran with the replica down")?;
    ensure(err.starts_with("default replica 127.0.0.1:") && err.contains("cannot connect"), format!("replica down: {err}"))?;
    Ok(())
}
