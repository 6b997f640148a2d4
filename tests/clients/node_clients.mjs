// Real-client suite, Node drivers: node-postgres (named prepared queries) and postgres.js (which
// pipelines and prepares by default), each connected through pgtenant as tenant 1 and tenant 2.
// Usage: node node_clients.mjs PORT TOKEN_TENANT_1 TOKEN_TENANT_2
import pg from "pg";
import postgres from "postgres";

const [port, t1, t2] = process.argv.slice(2);
const tokens = { 1: t1, 2: t2 };
const results = [];
const check = (cond, what) => { if (!cond) throw new Error(what); };

async function nodePostgres() {
  for (const tenant of [1, 2]) {
    const c = new pg.Client({ host: "127.0.0.1", port: Number(port), user: "alice", database: "app", password: tokens[tenant] });
    await c.connect();
    try {
      for (let i = 0; i < 10; i++) {
        const r = await c.query({ name: "own-rows", text: "select count(*)::int n, min(tenant_id) lo, max(tenant_id) hi from orders where tenant_id > $1", values: [0] });
        const { n, lo, hi } = r.rows[0];
        check(n > 0 && lo === tenant && hi === tenant, `tenant ${tenant} saw ${n} rows of ${lo}..${hi}`);
      }
      const ins = await c.query({ name: "ins", text: "insert into orders (tenant_id, amount) values ($1, $2) returning tenant_id", values: [tenant, 8500 + tenant] });
      check(ins.rows[0].tenant_id === tenant, "insert landed elsewhere");
      let refused = false;
      try { await c.query("insert into orders (tenant_id, amount) values ($1, 1)", [3 - tenant]); } catch (e) { refused = e.code === "42501"; }
      check(refused, "foreign insert not refused with 42501");
      await c.query("delete from orders where amount = $1", [8500 + tenant]);
    } finally { await c.end(); }
  }
}

async function postgresJs() {
  for (const tenant of [1, 2]) {
    const sql = postgres({ host: "127.0.0.1", port: Number(port), user: "alice", database: "app", password: tokens[tenant], max: 4, onnotice: () => {} });
    try {
      // many concurrent queries on a few connections: pipelined, prepared
      const rows = await Promise.all(Array.from({ length: 40 }, (_, i) =>
        sql`select tenant_id, current_setting('app.tenant_id') as ctx from orders where amount > ${i} limit 5`));
      for (const r of rows) for (const row of r) check(row.tenant_id === tenant && row.ctx === String(tenant), `tenant ${tenant} saw ${JSON.stringify(row)}`);
      await sql.begin(async (tx) => {
        const [row] = await tx`insert into orders (tenant_id, amount) values (${tenant}, ${8600 + tenant}) returning tenant_id`;
        check(row.tenant_id === tenant, "insert landed elsewhere");
      });
      let refused = false;
      try { await sql`insert into orders (tenant_id, amount) values (${3 - tenant}, 1)`; } catch (e) { refused = e.code === "42501"; }
      check(refused, "foreign insert not refused with 42501");
      await sql`delete from orders where amount = ${8600 + tenant}`;
    } finally { await sql.end(); }
  }
}

for (const [name, fn] of [["node-postgres (named queries)", nodePostgres], ["postgres.js", postgresJs]]) {
  try { await fn(); results.push([name, null]); } catch (e) { results.push([name, String(e && e.message || e)]); }
}
for (const [name, err] of results) console.log(`client ${name}: ${err ? "FAIL " + err : "pass"}`);
process.exit(results.some(([, err]) => err) ? 1 : 0);
