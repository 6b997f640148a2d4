//! Benchmark: the same workload through pgtenant with plain `current_setting` policies and with the
//! signed-context policies (`pgtenant.setting()`), interleaved on one throwaway cluster, plus the
//! verifying function's cost per call (bench/signed_context.sql), and the floor of any function in a
//! policy (a `SECURITY DEFINER` function that verifies nothing). Issue 16's target: signed TPS
//! ≥ 0.90× plain. Prints a table; docs/benchmarks.md ("Signed context") records a run.
//!
//!     cargo run --release -p pgtenant --example signed_tps [-- SECONDS ROUNDS CLIENTS]

mod cpu;

use std::process::Command;
use std::time::Duration;

use pgtenant::cluster::Cluster;
use pgtenant::config::Config;

const PLAIN: &str = "ALTER POLICY tenant_isolation ON orders
  USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer)
  WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer)";
const SIGNED: &str = "ALTER POLICY tenant_isolation ON orders
  USING (tenant_id = (SELECT pgtenant.setting('app.tenant_id'))::integer)
  WITH CHECK (tenant_id = (SELECT pgtenant.setting('app.tenant_id'))::integer)";
/// The floor of any policy that reads the tenant through a function: the same sub-select calling a
/// `SECURITY DEFINER` PL/pgSQL function that only returns `current_setting` (it verifies nothing,
/// so it is no defence; it measures what the call itself costs).
const FLOOR: &str = "ALTER POLICY tenant_isolation ON orders
  USING (tenant_id = (SELECT bench_floor.setting('app.tenant_id'))::integer)
  WITH CHECK (tenant_id = (SELECT bench_floor.setting('app.tenant_id'))::integer)";
const FLOOR_FUNCTION: &str = "CREATE SCHEMA bench_floor;
  GRANT USAGE ON SCHEMA bench_floor TO app_user;
  CREATE FUNCTION bench_floor.setting(name text) RETURNS text LANGUAGE plpgsql STABLE SECURITY DEFINER
    AS $$BEGIN RETURN pg_catalog.current_setting(name, true); END$$;
  GRANT EXECUTE ON FUNCTION bench_floor.setting(text) TO app_user;";
const SCRIPT: &str = "\\set id random(1, 200000)\nSELECT id, tenant_id, amount FROM orders WHERE id = :id;\n";

fn main() -> Result<(), String> {
    let (secs, rounds, clients) = cpu::run_args();
    // 200,000 orders spread over the fixture's tenants; tenant 1's token reads its ~share of them
    let cluster = cpu::cluster_with_orders(200_000)?;
    let key = "signed-tps-benchmark-key-0123456789abcdef";
    let secret = "signed-tps-benchmark-jwt-secret-0123456789";
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[backend]\nurl = \"{}\"\npool_size = 8\n[jwt]\nsecret = \"{secret}\"\n\
         [tenant]\nsettings = {{ \"app.tenant_id\" = \"tenant_id\", \"app.user_id\" = \"sub\" }}\nsigning_key = \"{key}\"\n[log]\nlevel = \"warn\"\n",
        cluster.url("app_user", "app-secret", "app")
    );
    let cfg = Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    cluster.psql_stdin("app", &pgtenant::install_sql::script(&cfg, "pgtenant")?).map_err(|e| e.to_string())?;
    cluster.psql_stdin("app", FLOOR_FUNCTION).map_err(|e| e.to_string())?;
    // count the full checks without timing anything else: only pgtenant.verify() runs with
    // track_functions (its SET clause; it already has one, so this costs it nothing more), not
    // pgtenant.setting(), which every signed query calls, nor anything in the plain runs. Each
    // transaction of the workload runs one query, so the transactions count setting()'s calls.
    cluster
        .psql("app", "ALTER FUNCTION pgtenant.verify(text) SET track_functions = 'pl'")
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    let proxy = rt.block_on(pgtenant::server::start(cfg)).map_err(|e| e.to_string())?;
    let token = pgtenant::jwt::mint_hs(
        &serde_json::json!({"tenant_id": 1, "sub": "bench", "exp": 4_000_000_000u64}),
        secret.as_bytes(),
        jsonwebtoken::Algorithm::HS256,
    );
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let script = dir.path().join("select.sql");
    std::fs::write(&script, SCRIPT).map_err(|e| e.to_string())?;
    let pgbench = Cluster::find_bindir().map_err(|e| e.to_string())?.join("pgbench");
    let postmaster = cpu::postmaster_pid(&cluster.data_dir())?;
    // one pgbench run: (TPS, CPU µs per transaction of Postgres, of pgtenant, of pgbench, transactions)
    let run = |mode: &str| -> Result<(f64, [f64; 3], f64), String> {
        let (pg0, me0) = (cpu::children_ticks(postmaster), cpu::own_ticks());
        let out = Command::new(&pgbench)
            .args(["-n", "-c", &clients.to_string(), "-j", "2", "-T", &secs.to_string(), "-M", mode, "-f"])
            .arg(&script)
            .args(["-h", "127.0.0.1", "-p", &proxy.addr.port().to_string(), "-U", "bench", "app"])
            .env("PGPASSWORD", &token)
            .output()
            .map_err(|e| e.to_string())?;
        let (pg1, me1) = (cpu::children_ticks(postmaster), cpu::own_ticks());
        let pg = cpu::children_delta(&pg0, &pg1);
        let (tps, n) = cpu::pgbench_result(&out)?;
        let us = |ticks: u64| ticks as f64 * 1e6 / cpu::TICKS_PER_SECOND / n;
        Ok((tps, [us(pg), us(me1.0 - me0.0), us(me1.1 - me0.1)], n))
    };
    println!("{} s runs, {rounds} interleaved rounds, {clients} clients, pool 8, primary-key read of orders", secs);
    println!(
        "| mode | plain TPS (median) | signed TPS (median) | signed / plain: median of rounds (range) | full checks per 1,000 signed queries | \
         CPU µs/tx plain: Postgres + pgtenant + pgbench | signed | plain / signed CPU | floor TPS (median) | floor / plain: median of rounds (range) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for mode in ["simple", "extended", "prepared"] {
        let (mut plain, mut signed, mut floor) = (Vec::new(), Vec::new(), Vec::new());
        let (mut plain_cpu, mut signed_cpu) = (Vec::new(), Vec::new());
        let mut signed_queries = 0.0;
        cluster.psql("app", "SELECT pg_stat_reset()").map_err(|e| e.to_string())?;
        for round in 0..rounds {
            // the three styles run in a rotating order, so no style always runs first or last
            for i in 0..3 {
                let style = (round as usize + i) % 3;
                cluster.psql("app", [PLAIN, SIGNED, FLOOR][style]).map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(200));
                let (tps, cpu, n) = run(mode)?;
                match style {
                    0 => {
                        plain.push(tps);
                        plain_cpu.push(cpu);
                    }
                    1 => {
                        signed.push(tps);
                        signed_queries += n;
                        signed_cpu.push(cpu);
                    }
                    _ => floor.push(tps),
                }
            }
        }
        // each round's ratio is of runs seconds apart, under the same outside load
        let ratios = |num: &[f64]| -> Vec<f64> { num.iter().zip(&plain).map(|(n, p)| n / p).collect() };
        let (mut signed_ratio, mut floor_ratio) = (ratios(&signed), ratios(&floor));
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let spread = |v: &[f64]| format!("{:.2}–{:.2}", v[0], v[v.len() - 1]);
        let (sr, fr) = (median(&mut signed_ratio), median(&mut floor_ratio));
        let (p, s, f) = (median(&mut plain), median(&mut signed), median(&mut floor));
        // backends report their counts when idle for a second
        std::thread::sleep(Duration::from_millis(1500));
        let verified = cluster
            .psql("app", "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE schemaname = 'pgtenant' AND funcname = 'verify'")
            .map_err(|e| e.to_string())?;
        let per_1000 = match verified.trim().parse::<f64>() {
            Ok(verify) if signed_queries > 0.0 => format!("{:.2}", verify * 1000.0 / signed_queries),
            _ => "?".into(),
        };
        // CPU per transaction: the median of the runs' totals, split as that run split it
        let cpu = |v: &mut Vec<[f64; 3]>| {
            v.sort_by(|a, b| a.iter().sum::<f64>().total_cmp(&b.iter().sum::<f64>()));
            v[v.len() / 2]
        };
        let (pc, sc) = (cpu(&mut plain_cpu), cpu(&mut signed_cpu));
        let show = |c: [f64; 3]| format!("{:.0} = {:.0} + {:.0} + {:.0}", c.iter().sum::<f64>(), c[0], c[1], c[2]);
        println!(
            "| {mode} | {p:.0} | {s:.0} | {sr:.2} ({}) | {per_1000} | {} | {} | {:.2} | {f:.0} | {fr:.2} ({}) |",
            spread(&signed_ratio),
            show(pc),
            show(sc),
            pc.iter().sum::<f64>() / sc.iter().sum::<f64>(),
            spread(&floor_ratio)
        );
    }
    // the per-call cost of the verifier, as the restricted role with the key
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/signed_context.sql");
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", &format!("key={key}"), "-f"])
        .arg(&file)
        .arg(cluster.url("app_user", "app-secret", "app"))
        .output()
        .map_err(|e| e.to_string())?;
    println!("\nbench/signed_context.sql:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    rt.block_on(proxy.stop());
    Ok(())
}
