//! Identifier spellings the server folds or truncates in ways a naive reader would not: guarded
//! setting and function names written with non-ASCII look-alike capitals (the Kelvin sign `K`
//! U+212A, `İ` U+0130: the server folds only ASCII `A`–`Z`, in identifiers and in setting names),
//! and identifiers longer than 63 bytes (the server cuts every identifier, quoted or not, to 63
//! bytes on a character boundary, with a NOTICE), in `SET`/`RESET`, `set_config` and its casts, a
//! Bind parameter and the startup packet.
//!
//! Nothing here is a guessed outcome: every attempt is first run straight against Postgres, as the
//! restricted role, in a transaction whose guarded settings are set (the oracle), and what it
//! changed there decides what pgtenant must do with it:
//! - it changed a guarded setting (or took a session advisory lock): pgtenant refuses it
//!   (`pgtenant: …`), as a simple Query and as a Parse;
//! - it changed nothing guarded (the server reads another name): pgtenant lets it through to the
//!   server like any other statement — it must not matter that it looks like a guarded name.
//!
//! Either way the attacker (tenant 1, `pool_size = 1`) keeps its exact context — every guarded
//! setting, inside the attempt's own transaction and after it — sees no foreign row, tenant 2's
//! rows are unchanged, and the next client on the backend is exactly tenant 2.


use tokio_postgres::types::Type;

use crate::adversarial::{finish, victim, Checks};
use crate::common::*;
use crate::wire::{self, Reply, Wire};

const KELVIN: char = '\u{212A}';
const DOTTED_I: char = '\u{0130}';

/// The guarded settings of this scenario's proxy: the suite's two, the claims, and four more
/// (all from the `tenant_id` claim) whose names the look-alike and long spellings aim at.
struct Names {
    /// Has a `k`: the Kelvin sign looks like its capital.
    kelvin: String,
    /// A 63-byte last component: `app.<that>XYZ` is cut to it.
    component63: String,
    /// 63 bytes in all: the quoted `"app.<…>XYZ"` is cut to it.
    whole63: String,
    /// 62 bytes: the quoted `"app.<…>é"` (64 bytes) is cut before the `é`, to it.
    whole62: String,
}

impl Names {
    fn new() -> Names {
        Names {
            kelvin: "app.kelvin".into(),
            component63: format!("app.{}", "y".repeat(63)),
            whole63: format!("app.{}", "x".repeat(59)),
            whole62: format!("app.{}", "z".repeat(58)),
        }
    }

    fn extra(&self) -> [&str; 4] {
        [&self.kelvin, &self.component63, &self.whole63, &self.whole62]
    }

    fn guarded(&self) -> Vec<&str> {
        let mut all = vec!["app.tenant_id", "app.user_id", "request.jwt.claims"];
        all.extend(self.extra());
        all
    }

    /// One text fingerprint of the guarded state: every guarded setting, and the session advisory
    /// locks the backend holds.
    fn state_sql(&self) -> String {
        let settings: Vec<String> = self.guarded().iter().map(|n| format!("coalesce(current_setting('{n}', true), '<unset>')")).collect();
        format!(
            "concat_ws('|', {}, (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()))",
            settings.join(", ")
        )
    }

    /// Who the attacker is: the state, foreign rows, all rows, role.
    fn who_sql(&self) -> String {
        format!("select {}, count(*) filter (where tenant_id <> 1), count(*), current_user::text from orders", self.state_sql())
    }
}

/// One attempt.
enum Try {
    /// A query string: sent as a simple Query, and (`parse`) as a Parse of its own. Not `exact`:
    /// pgtenant may refuse it although the server reads another name (a `set_config` in any
    /// schema is refused, by design), as long as it is harmless.
    Sql { sql: String, parse: bool, exact: bool },
    /// `sql` parsed with parameter types `types` (OIDs) and `value` bound as `$1`.
    Bound { sql: &'static str, types: Vec<u32>, value: String },
    /// `name = '2'` in the startup packet: as a parameter of its own, or in `options` (`-c`).
    Startup { name: String, in_options: bool },
}

impl Try {
    fn label(&self) -> String {
        match self {
            Try::Sql { sql, .. } => format!("{:?}", short(sql)),
            Try::Bound { sql, types, value } => format!("{sql:?} types {types:?} with $1 = {:?}", short(value)),
            Try::Startup { name, in_options: false } => format!("startup parameter {:?} = 2", short(name)),
            Try::Startup { name, in_options: true } => format!("startup options -c {:?}=2", short(name)),
        }
    }
}

/// Long names shortened for the output: the first 12 and last 6 characters.
fn short(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 40 {
        return s.to_string();
    }
    let head: String = chars[..12].iter().collect();
    let tail: String = chars[chars.len() - 6..].iter().collect();
    format!("{head}…({} bytes)…{tail}", s.len())
}

fn attempts(n: &Names) -> Vec<Try> {
    let sql = |s: String| Try::Sql { sql: s, parse: true, exact: true };
    let k = KELVIN;
    let i = DOTTED_I;
    let (y63, x59, z58) = ("y".repeat(63), "x".repeat(59), "z".repeat(58));
    let pad = "q".repeat(60);
    let mut all = vec![
        // function names: look-alike capitals are other names; ASCII capitals and quoted
        // lower case are set_config
        sql(format!("select SET_CONF{i}G('app.tenant_id', '2', false)")),
        sql(format!("select pg_catalog.set_conf{i}g('app.tenant_id', '2', true)")),
        sql("select PG_CATALOG.SET_CONFIG('app.tenant_id', '2', true)".into()),
        sql("select \"pg_catalog\".\"set_config\"('app.tenant_id', '2', true)".into()),
        sql("select \"SET_CONFIG\"('app.tenant_id', '2', true)".into()),
        // longer than 63 bytes: cut to a name that is not set_config (nor pg_catalog)
        sql(format!("select set_config{pad}('app.tenant_id', '2', true)")),
        sql(format!("select \"set_config{pad}\"('app.tenant_id', '2', true)")),
        Try::Sql { sql: format!("select pg_catalog{pad}.set_config('app.tenant_id', '2', true)"), parse: true, exact: false },
        // a guarded function that is not set_config: a session advisory lock
        sql(format!("select pg_advisory_loc{k}(4711)")),
        sql("select PG_ADVISORY_LOCK(4711)".into()),
        // SET / RESET names with look-alike capitals
        sql(format!("SET app.tenant_{i}d = '2'")),
        sql(format!("SET LOCAL APP.TENANT_{i}D = '2'")),
        sql(format!("SET LOCAL app.{k}ELVIN = '2'")),
        sql(format!("SET \"app.{k}elvin\" = '2'")),
        sql(format!("RESET app.{k}elvin")),
        sql("SET LOCAL APP.KELVIN = '2'".into()),
        sql("SET \"APP.KELVIN\" = '2'".into()),
        sql("RESET \"App.Kelvin\"".into()),
        // SET / RESET names longer than 63 bytes, cut to a guarded name or not
        sql(format!("SET LOCAL app.{y63}XYZ = '2'")),
        sql(format!("SET LOCAL app.\"{y63}XYZ\" = '2'")),
        sql(format!("SET LOCAL app.U&\"{y63}\\0058YZ\" = '2'")),
        sql(format!("SET LOCAL APP.{}XYZ = '2'", y63.to_uppercase())),
        sql(format!("SET LOCAL \"app.{x59}XYZ\" = '2'")),
        sql(format!("SET LOCAL \"APP.{}XYZ\" = '2'", x59.to_uppercase())),
        sql(format!("SET LOCAL app.{x59}XYZ = '2'")),
        sql(format!("RESET \"app.{x59}XYZ\"")),
        sql(format!("SET LOCAL \"app.{z58}é\" = '2'")),
        sql(format!("SET LOCAL \"app.{z58}{k}\" = '2'")),
        sql(format!("SET LOCAL \"app.{z58}zé\" = '2'")),
        sql(format!("SET LOCAL \"app.{y63}\" = '2'")),
        // set_config names: a string is never cut, a name-typed value is
        sql(format!("select set_config('app.tenant_{i}d', '2', false)")),
        sql(format!("select set_config('APP.{k}ELVIN', '2', true)")),
        sql("select set_config(U&'app.\\212Aelvin', '2', true)".into()),
        sql("select set_config('APP.KELVIN', '2', true)".into()),
        sql(format!("select set_config('app.{x59}XYZ', '2', true)")),
        sql(format!("select set_config('app.{y63}', '2', true)")),
        sql(format!("select set_config('app.{x59}XYZ'::name, '2', true)")),
        sql(format!("select set_config(name 'app.{x59}XYZ', '2', true)")),
        sql(format!("select set_config(cast('app.{x59}XYZ' as name), '2', true)")),
        sql(format!("select set_config('app.{x59}XYZ'::char(63), '2', true)")),
        // SET clauses inside other statements (in a transaction, rolled back)
        Try::Sql { sql: format!("BEGIN; SET LOCAL \"app.{x59}XYZ\" TO '2'; select 1"), parse: false, exact: true },
        Try::Sql { sql: format!("BEGIN; SET LOCAL app.{k}elvin TO '2'; select 1"), parse: false, exact: true },
    ];
    // bind parameters: text is taken as sent, a `name` parameter is cut
    let bound = "select set_config($1, '2', true)";
    for (types, value) in [
        (vec![], "APP.KELVIN".to_string()),
        (vec![], format!("app.{k}elvin")),
        (vec![25], format!("app.{x59}XYZ")),
        (vec![25], n.whole63.to_uppercase()),
        (vec![19], format!("app.{x59}XYZ")),
    ] {
        all.push(Try::Bound { sql: bound, types, value });
    }
    // startup: setting names are not identifiers (never cut), compared with ASCII case folded
    for name in ["APP.KELVIN".to_string(), format!("app.{k}elvin"), format!("APP.TENANT_{i}D"), format!("app.{x59}XYZ"), n.component63.to_uppercase()] {
        for in_options in [false, true] {
            all.push(Try::Startup { name: name.clone(), in_options });
        }
    }
    all
}

fn e(err: impl std::fmt::Debug) -> String {
    format!("{err:?}")
}

async fn direct(env: &Env, options: Option<&str>) -> Result<tokio_postgres::Client, String> {
    let mut cfg: tokio_postgres::Config = env.cluster.url("app_user", "app-secret", "app").parse().map_err(e)?;
    if let Some(o) = options {
        cfg.options(o);
    }
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(e)?;
    tokio::spawn(conn);
    Ok(c)
}

async fn state(c: &tokio_postgres::Client, n: &Names) -> Result<String, String> {
    c.query_one(&format!("select {}", n.state_sql()), &[]).await.map(|r| r.get(0)).map_err(e)
}

/// What the attempt changes on a connection straight to Postgres as the restricted role: the
/// guarded state before and after, or None when it changes nothing guarded.
async fn oracle(env: &Env, n: &Names, attempt: &Try) -> Result<Option<String>, String> {
    if let Try::Startup { name, .. } = attempt {
        let plain = state(&direct(env, None).await?, n).await?;
        let after = match direct(env, Some(&format!("-c {name}=2"))).await {
            Ok(c) => state(&c, n).await?,
            Err(_) => return Ok(None), // the server refuses the login: nothing runs
        };
        return Ok((after != plain).then(|| format!("{plain} -> {after}")));
    }
    let c = direct(env, None).await?;
    c.batch_execute("BEGIN").await.map_err(e)?;
    let set: Vec<String> = n.guarded().iter().map(|g| format!("set_config('{g}', '1', true)")).collect();
    c.batch_execute(&format!("select {}", set.join(", "))).await.map_err(e)?;
    let before = state(&c, n).await?;
    let ran = match attempt {
        Try::Sql { sql, .. } => c.simple_query(sql).await.map(|_| ()),
        // the raw Bind sends its parameter in text format, read by the type's input function
        // (`namein` cuts a long name; tokio-postgres would send binary, which `namerecv` refuses):
        // a PREPAREd statement run with a literal argument does the same
        Try::Bound { sql, types, value } => {
            let types: Vec<String> = types.iter().map(|&t| Type::from_oid(t).map_or(t.to_string(), |t| t.name().to_string())).collect();
            let types = if types.is_empty() { String::new() } else { format!("({})", types.join(", ")) };
            c.batch_execute(&format!("PREPARE spelling_oracle{types} AS {sql}")).await.map_err(e)?;
            c.simple_query(&format!("EXECUTE spelling_oracle('{}')", value.replace('\'', "''"))).await.map(|_| ())
        }
        Try::Startup { .. } => unreachable!("handled above"),
    };
    if ran.is_err() {
        return Ok(None); // an error rolls back everything the transaction did
    }
    let after = state(&c, n).await?;
    Ok((after != before).then(|| format!("{before} -> {after}")))
}

/// Refused by pgtenant itself (not an error of the server's).
fn refused_by_pgtenant(r: &Reply) -> bool {
    r.errors.first().is_some_and(|e| e.message.starts_with("pgtenant: "))
}

fn is_self(r: &Reply, baseline: &str) -> bool {
    r.ok() && r.get(0, 0) == baseline && r.get(0, 1) == "0" && r.get(0, 2) != "0" && r.get(0, 3) == "app_user"
}

fn who_detail(r: &Reply) -> String {
    format!("state {:?}, foreign {}, rows {}, user {} ({})", short(&r.get(0, 0)), r.get(0, 1), r.get(0, 2), r.get(0, 3), r.summary())
}

pub async fn spellings(env: &Env) -> TestResult {
    let mut c = Checks::new("identifier_spellings");
    let n = Names::new();
    let before = victim(env);
    let settings = n.extra().iter().map(|s| format!(", \"{s}\" = \"tenant_id\"")).collect::<String>();
    let suite = "settings = { \"app.tenant_id\" = \"tenant_id\", \"app.user_id\" = \"sub\" }";
    let text = config_text(env, "pool_size = 1", "");
    ensure(text.contains(suite), "the suite's settings line changed: update spelling.rs")?;
    let text = text.replacen(suite, &format!("settings = {{ \"app.tenant_id\" = \"tenant_id\", \"app.user_id\" = \"sub\"{settings} }}"), 1);
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|err| format!("config refused: {err}"))?;
    let p = pgtenant::server::start(cfg).await?;
    let who = n.who_sql();
    // one token for every login: the claims setting (part of the state) has its times
    let tok = token(1, "mallory");
    let mut a = Wire::connect(p.addr, &tok).await?;
    let r = a.simple(&who).await;
    let baseline = r.get(0, 0);
    let fields: Vec<&str> = baseline.split('|').collect();
    let sane = r.ok() && fields.len() == 8 && fields[0] == "1" && fields[1] == "mallory" && fields[3..7].iter().all(|v| *v == "1") && fields[7] == "0";
    c.check("every guarded setting carries tenant 1's context", sane, who_detail(&r));
    let (mut guarded, mut other) = (0, 0);
    for attempt in attempts(&n) {
        let label = attempt.label();
        let changes = oracle(env, &n, &attempt).await?;
        let (expect, what) = match &changes {
            Some(diff) => (true, format!("the server reads a guarded name ({})", short(diff))),
            None => (false, "the server reads another name".to_string()),
        };
        if expect {
            guarded += 1;
        } else {
            other += 1;
        }
        let verdict = |r: &Reply| refused_by_pgtenant(r) == expect;
        let want = if expect { "refused by pgtenant" } else { "not refused by pgtenant" };
        match &attempt {
            Try::Sql { sql, parse, exact } => {
                let verdict = |r: &Reply| if *exact { verdict(r) } else { !expect || refused_by_pgtenant(r) };
                // in the attempt's own transaction: nothing guarded changed
                let r = a.simple(&format!("{sql}; {who}")).await;
                let last = r.rows.last().cloned().unwrap_or_default();
                let seen = last.first().cloned().flatten().unwrap_or_default();
                c.check(&format!("{label} + who, one Query: context intact"), !r.ok() || (seen == baseline && last.get(1) == Some(&Some("0".into()))), format!("state {:?}; {}", short(&seen), r.summary()));
                let _ = a.simple("ROLLBACK").await;
                let r = a.simple(sql).await;
                c.check(&format!("Query {label}: {what}: {want}"), verdict(&r), r.summary());
                let _ = a.simple("ROLLBACK").await;
                let r = a.simple(&who).await;
                c.check(&format!("after Query {label}: attacker still exactly tenant 1"), is_self(&r, &baseline), who_detail(&r));
                if *parse {
                    let r = a.ext(sql).await;
                    c.check(&format!("Parse {label}: {what}: {want}"), verdict(&r), r.summary());
                    let _ = a.simple("ROLLBACK").await;
                    let r = a.simple(&who).await;
                    c.check(&format!("after Parse {label}: attacker still exactly tenant 1"), is_self(&r, &baseline), who_detail(&r));
                }
            }
            Try::Bound { sql, types, value } => {
                let batch = [wire::parse("", sql, types), wire::bind("", "", &[Some(value.as_str())]), wire::execute("", 0), wire::unnamed(&who), wire::sync()].concat();
                let r = a.round(&batch, 1).await;
                c.check(&format!("{label}: {what}: {want}"), verdict(&r), r.summary());
                let seen = r.rows.last().and_then(|row| row.first().cloned().flatten()).unwrap_or_default();
                c.check(&format!("{label} + who, one batch: context intact"), !r.ok() || seen == baseline, format!("state {:?}; {}", short(&seen), r.summary()));
                let r = a.simple(&who).await;
                c.check(&format!("after {label}: attacker still exactly tenant 1"), is_self(&r, &baseline), who_detail(&r));
            }
            Try::Startup { name, in_options } => {
                let options = format!("-c {name}=2");
                let mut params = vec![("user", "alice"), ("database", "app")];
                params.push(if *in_options { ("options", options.as_str()) } else { (name.as_str(), "2") });
                match Wire::login(p.addr, &params, &tok).await {
                    Err(err) => {
                        c.check(&format!("{label}: {what}: {want}"), expect && err.contains("pgtenant: "), err);
                    }
                    Ok(mut w) => {
                        c.check(&format!("{label}: {what}: {want}"), !expect, "logged in");
                        let r = w.simple(&who).await;
                        c.check(&format!("{label}: the session is exactly tenant 1"), is_self(&r, &baseline), who_detail(&r));
                        w.close().await;
                    }
                }
            }
        }
    }
    println!("  [identifier_spellings] {guarded} spellings the server reads as a guarded name, {other} it reads as another");
    c.check("both kinds of spelling are tried", guarded >= 10 && other >= 10, format!("{guarded} guarded, {other} other"));
    a.close().await;
    finish(env, p, c, &before, "after the spellings").await
}
