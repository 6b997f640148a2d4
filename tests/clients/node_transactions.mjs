// Real-client suite, transactions (issue 15), Node drivers: node-postgres with BEGIN ISOLATION
// LEVEL … (simple protocol, then extended-protocol queries) and postgres.js `sql.begin(options)`
// (pipelined, prepared). Each must get the level it asked for inside the transaction.
// Usage: node node_transactions.mjs PORT TOKEN_TENANT_1 TOKEN_TENANT_2 [SESSION_MODE_PORT]
import pg from "pg";
import postgres from "postgres";

const [port, t1, , sessionPort] = process.argv.slice(2);
const results = [];
const check = (cond, what) => { if (!cond) throw new Error(what); };
const MODES = "select current_setting('transaction_isolation') iso, current_setting('transaction_read_only') ro, current_setting('transaction_deferrable') def, current_setting('app.tenant_id') t";

async function nodePostgres() {
  const c = new pg.Client({ host: "127.0.0.1", port: Number(port), user: "alice", database: "app", password: t1 });
  await c.connect();
  try {
    for (const [begin, want] of [
      ["BEGIN ISOLATION LEVEL SERIALIZABLE", ["serializable", "off", "off"]],
      ["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", ["repeatable read", "on", "off"]],
      ["BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", ["serializable", "on", "on"]],
    ]) {
      await c.query(begin);
      const r = await c.query({ name: "modes", text: MODES + " where $1::int = 1", values: [1] });
      const { iso, ro, def, t } = r.rows[0];
      check(iso === want[0] && ro === want[1] && def === want[2] && t === "1", `${begin}: ${JSON.stringify(r.rows[0])}`);
      await c.query("COMMIT");
    }
    await c.query("BEGIN");
    await c.query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ");
    const r = await c.query(MODES);
    check(r.rows[0].iso === "repeatable read", `SET TRANSACTION: ${JSON.stringify(r.rows[0])}`);
    await c.query("COMMIT");
  } finally { await c.end(); }
}

async function sessionPid() {
  const c = new pg.Client({ host: "127.0.0.1", port: Number(sessionPort), user: "alice", database: "app", password: t1 });
  await c.connect();
  try {
    const r = await c.query("select pg_backend_pid() pid");
    check(c.processID === r.rows[0].pid, `session mode: processID ${c.processID}, pg_backend_pid() ${r.rows[0].pid}`);
  } finally { await c.end(); }
}

async function postgresJs() {
  const sql = postgres({ host: "127.0.0.1", port: Number(port), user: "alice", database: "app", password: t1, max: 2, onnotice: () => {} });
  try {
    for (const [opts, want] of [["isolation level serializable", "serializable"], ["isolation level repeatable read read only", "repeatable read"]]) {
      const rows = await sql.begin(opts, async (tx) => tx.unsafe(MODES));
      check(rows[0].iso === want && rows[0].t === "1", `sql.begin('${opts}'): ${JSON.stringify(rows[0])}`);
    }
    // many transactions at once on two connections: pipelined
    const all = await Promise.all(Array.from({ length: 20 }, (_, i) =>
      sql.begin(i % 2 ? "isolation level serializable" : "read write", async (tx) => (await tx`select current_setting('transaction_isolation') iso, current_setting('app.tenant_id') t, ${i}::int i`)[0])));
    for (const row of all) check(row.iso === (row.i % 2 ? "serializable" : "read committed") && row.t === "1", `concurrent: ${JSON.stringify(row)}`);
  } finally { await sql.end(); }
}

for (const [name, fn] of [["node-postgres BEGIN ISOLATION LEVEL", nodePostgres], ["postgres.js sql.begin(options)", postgresJs], ["node-postgres session-mode processID", sessionPid]]) {
  try { await fn(); results.push([name, null]); } catch (e) { results.push([name, String(e && e.message || e)]); }
}
for (const [name, err] of results) console.log(`client ${name}: ${err ? "FAIL " + err : "pass"}`);
process.exit(results.some(([, err]) => err) ? 1 : 0);
