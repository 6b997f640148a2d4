"""Validates deploy/ without a container engine: every PGTENANT_* variable is documented, probes hit
/readyz and /healthz on a declared port, containers run as non-root, secret and config map references
resolve, each embedded pgtenant.toml passes `pgtenant check` with the manifest's own environment
(including what a `sh -c` command exports, e.g. the peer id derived from the pod's ordinal) and
draws no cleartext-token warning from it (a listener beyond loopback must require TLS), Services,
PodDisruptionBudgets and autoscalers select pods of their file, the termination grace period covers
the preStop pause plus server.shutdown_timeout_s, and several instances beyond loopback form a
fleet: a StatefulSet whose serviceName is a headless Service, a PodDisruptionBudget, a unique peer
id per pod and a [peers] table naming every pod up to the autoscaler's maxReplicas. The compose
file's paths exist, and the Dockerfile is multi-stage and non-root. The Grafana dashboard
and the Prometheus alert rules name only metrics pgtenant exports (the names in
proxy/src/metrics.rs, each documented in docs/operations.md); the rules pass `promtool check rules`
and the scenarios in tests/deploy/alerts_test.yaml (`promtool test rules`) when promtool is on PATH
or at tests/deploy/.promtool (scripts/test.sh puts it there), and a structural check otherwise.

Usage: validate.py REPO_ROOT PGTENANT_BINARY
"""

import os
import re
import subprocess
import sys
import tempfile

import json
import shutil
import tomllib

import yaml

ROOT, BIN = sys.argv[1], sys.argv[2]
DEPLOY = os.path.join(ROOT, "deploy")
documented = set(re.findall(r"PGTENANT_[A-Z_]+", open(os.path.join(ROOT, "docs", "configuration.md")).read()))
documented |= {"PGTENANT_CONFIG", "PGTENANT_LOG"}
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def pgtenant_check(toml_text, env, label):
    """Runs `pgtenant check` on a config, with generated TLS files standing in for mounted ones."""
    with tempfile.TemporaryDirectory() as d:
        for key in ("tls_cert", "tls_key", "tls_ca_file"):
            toml_text = re.sub(rf'{key}\s*=\s*"[^"]*"', f'{key} = "{d}/{key}.pem"', toml_text)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "1", "-subj", "/CN=x", "-keyout", f"{d}/tls_key.pem", "-out", f"{d}/tls_cert.pem"],
                       check=True, capture_output=True)
        os.link(f"{d}/tls_cert.pem", f"{d}/tls_ca_file.pem")
        path = os.path.join(d, "pgtenant.toml")
        open(path, "w").write(toml_text)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGTENANT_")}
        full_env.update(env)
        for name in env:
            for key in ("tls_cert", "tls_key", "tls_ca_file"):
                if name.endswith(key.upper()):
                    full_env[name] = f"{d}/{key}.pem"
        r = subprocess.run([BIN, "check", "--config", path], env=full_env, capture_output=True, text=True)
        check(r.returncode == 0, f"{label}: pgtenant check failed: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            check("bearer credentials" not in line, f"{label}: {line.strip()}")


IMAGE_BINARY = "/usr/local/bin/pgtenant"  # where deploy/Dockerfile installs it (checked in dockerfile())


def selects(selector, labels):
    """A label selector (matchLabels form) that is not empty and matches `labels`."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def entrypoint_env(c, env, label):
    """The PGTENANT_* environment pgtenant starts with: the container's own, plus whatever a
    `sh -c` command exports before exec'ing the image's binary. The command is run here with that
    binary replaced by a script that prints its environment."""
    cmd = c.get("command")
    if not cmd:
        return {k: v for k, v in env.items() if k.startswith("PGTENANT_")}
    shell = len(cmd) >= 3 and cmd[0] in ("/bin/sh", "sh") and cmd[1] == "-c" and f"exec {IMAGE_BINARY} " in cmd[2]
    check(shell, f"{label}: command must be `/bin/sh -c '… exec {IMAGE_BINARY} \"$@\"'`")
    if not shell:
        return {}
    with tempfile.TemporaryDirectory() as d:
        printenv = os.path.join(d, "printenv")
        open(printenv, "w").write("#!/bin/sh\nexec env\n")
        os.chmod(printenv, 0o755)
        r = subprocess.run(["/bin/sh", "-c", cmd[2].replace(IMAGE_BINARY, printenv), *cmd[3:], *c.get("args", [])],
                           env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True)
    check(r.returncode == 0, f"{label}: command failed: {r.stderr.strip()}")
    pairs = (line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return {k: v for k, v in pairs if k.startswith("PGTENANT_")}


def effective(toml_text, env):
    """The settings validate.py reasons about, as pgtenant reads them: the file, then the environment."""
    doc = tomllib.loads(toml_text)
    server = doc.get("server", {})
    peers = doc.get("peers", {})
    if "PGTENANT_PEERS" in env:
        peers = json.loads(env["PGTENANT_PEERS"])
    peer_id = env.get("PGTENANT_SERVER_PEER_ID", server.get("peer_id"))
    return {
        "listen": env.get("PGTENANT_SERVER_LISTEN", server.get("listen", "127.0.0.1:6432")),
        "shutdown_timeout_s": int(env.get("PGTENANT_SERVER_SHUTDOWN_TIMEOUT_S", server.get("shutdown_timeout_s", 30))),
        "peer_id": None if peer_id is None else int(peer_id),
        "peers": {str(k): v for k, v in peers.items()},
    }


def prestop_seconds(c):
    hook = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    cmd = hook.get("exec", {}).get("command", [])
    return int(cmd[1]) if len(cmd) == 2 and os.path.basename(cmd[0]) == "sleep" else 0


def kubernetes(path):
    name = os.path.basename(path)
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    configs = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    check(workloads, f"{path}: no Deployment or StatefulSet")
    pod_labels = [w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads]
    for svc, spec in services.items():
        check(any(selects(spec.get("selector"), labels) for labels in pod_labels), f"{name}: Service {svc} selects no pods of this file")
    for pdb in pdbs:
        check(any(selects(pdb["spec"].get("selector", {}).get("matchLabels"), labels) for labels in pod_labels),
              f"{name}: PodDisruptionBudget {pdb['metadata']['name']} selects no pods of this file")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        check(any(w["kind"] == ref.get("kind") and w["metadata"]["name"] == ref.get("name") for w in workloads),
              f"{name}: HorizontalPodAutoscaler {hpa['metadata']['name']} targets {ref.get('kind')} {ref.get('name')}, not in this file")
    for dep in workloads:
        workload(name, dep, secrets, configs, services, pdbs, hpas)


def workload(name, dep, secrets, configs, services, pdbs, hpas):
    """One Deployment or StatefulSet: its pgtenant containers, and for a fleet its peers."""
    kind, wname = dep["kind"], dep["metadata"]["name"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    check(selects(dep["spec"]["selector"].get("matchLabels"), labels), f"{name}: {kind} {wname}'s selector does not match its pods")
    hpa = next((h["spec"] for h in hpas if h["spec"]["scaleTargetRef"].get("name") == wname), None)
    replicas = dep["spec"].get("replicas", 1)
    instances = max(replicas, hpa["maxReplicas"]) if hpa else replicas
    if hpa:
        check(hpa.get("minReplicas", 1) <= replicas <= hpa["maxReplicas"], f"{name}: {wname} replicas outside the HPA's range")
    # a StatefulSet's pods are <name>-0 … <name>-(n-1); a Deployment's get random names
    pods = [f"{wname}-{i}" for i in range(instances)] if kind == "StatefulSet" else [f"{wname}-5d4f8b9c7-x2x4z"]
    spec = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        if "pgtenant" not in c["image"]:
            continue
        label = f"{name}:{wname}/{c['name']}"
        env, from_pod = {}, {}
        for e in c.get("env", []):
            check(e["name"] in documented or not e["name"].startswith("PGTENANT_"), f"{label}: {e['name']} is not a documented variable")
            if "value" in e:
                env[e["name"]] = str(e["value"])
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                check(ref["name"] in secrets and ref["key"] in secrets[ref["name"]], f"{label}: secret {ref} not defined")
                env[e["name"]] = secrets.get(ref["name"], {}).get(ref["key"], "")
            field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if field:
                check(field == "metadata.name", f"{label}: {e['name']}: only metadata.name is simulated here")
                from_pod[e["name"]] = field
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet", {})
            check(get.get("path") == want and get.get("port") in ports, f"{label}: {probe} must GET {want} on a declared port")
        sc = c.get("securityContext", {})
        check(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{label}: must run as non-root")
        toml_text = None
        for m in c.get("volumeMounts", []):
            secret = volumes.get(m["name"], {}).get("secret", {}).get("secretName")
            if secret:
                check(secret in secrets, f"{label}: secret {secret} not defined")
                continue
            cm = volumes.get(m["name"], {}).get("configMap", {}).get("name")
            check(cm in configs, f"{label}: config map {cm} not defined")
            if cm in configs and "pgtenant.toml" in configs[cm]:
                toml_text = configs[cm]["pgtenant.toml"]
        if toml_text is None:
            continue
        ids = {}
        for pod in pods:
            pod_env = entrypoint_env(c, {**env, **{k: pod for k in from_pod}}, f"{label} ({pod})")
            pgtenant_check(toml_text, pod_env, f"{label} ({pod})")
            settings = effective(toml_text, pod_env)
            ids[pod] = settings["peer_id"]
        # SIGTERM drains for up to shutdown_timeout_s, after the preStop pause
        need = prestop_seconds(c) + settings["shutdown_timeout_s"]
        check(spec.get("terminationGracePeriodSeconds", 30) >= need,
              f"{label}: terminationGracePeriodSeconds must cover the preStop pause + server.shutdown_timeout_s ({need} s)")
        host, port = settings["listen"].rsplit(":", 1)
        if instances > 1 and host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            fleet(label, dep, services, pdbs, ids, settings["peers"], int(port), ports, instances)


def fleet(label, dep, services, pdbs, ids, peers, port, ports, instances):
    """Several instances behind one Service: each pod's peer id and [peers] address must match, for
    every pod the HPA may create, so a cancel that reaches the wrong instance is forwarded."""
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    check(dep["kind"] == "StatefulSet", f"{label}: {instances} instances need a StatefulSet (a stable ordinal per pod for server.peer_id)")
    if dep["kind"] != "StatefulSet":
        return
    headless = dep["spec"].get("serviceName")
    svc = services.get(headless, {})
    check(svc.get("clusterIP") == "None" and selects(svc.get("selector"), labels),
          f"{label}: serviceName {headless} is not a headless Service of this file selecting the pods")
    check(any(p["port"] == port for p in svc.get("ports", [])), f"{label}: headless Service {headless} does not expose port {port}")
    check(port in ports.values(), f"{label}: server.listen port {port} is not a container port")
    check(any(selects(p["spec"].get("selector", {}).get("matchLabels"), labels) for p in pdbs), f"{label}: no PodDisruptionBudget selects the pods")
    check(len(set(ids.values())) == len(ids) and None not in ids.values(), f"{label}: peer ids not set and unique per pod: {ids}")
    want = {str(i): f"{pod}.{headless}:{port}" for pod, i in ids.items()}
    check(peers == want, f"{label}: [peers] must list every pod up to the HPA's maxReplicas ({instances}): want {want}, got {peers}")


def compose(path):
    doc = yaml.safe_load(open(path))
    services = doc.get("services", {})
    check({"postgres", "pgtenant"} <= set(services), f"{path}: needs postgres and pgtenant services")
    env = services.get("pgtenant", {}).get("environment", {})
    for k in env:
        check(k in documented, f"compose.yaml: {k} is not a documented variable")
    named = set(doc.get("volumes") or {})
    for service in services.values():
        for v in service.get("volumes", []):
            src = v.split(":")[0]
            if src in named:
                continue
            check(os.path.exists(os.path.join(DEPLOY, src)), f"compose.yaml: {src} does not exist")
    build = services.get("pgtenant", {}).get("build", {})
    check(os.path.exists(os.path.join(DEPLOY, build.get("context", "."), build.get("dockerfile", "Dockerfile"))), "compose.yaml: Dockerfile not found")
    pgtenant_check(open(os.path.join(ROOT, "config", "pgtenant.toml")).read(), {k: str(v) for k, v in env.items()}, "compose.yaml")


METRICS = set(re.findall(r'pub const [A-Z_]+: &str = "(pgtenant_[a-z0-9_]+)"', open(os.path.join(ROOT, "proxy", "src", "metrics.rs")).read()))
OPERATIONS = open(os.path.join(ROOT, "docs", "operations.md")).read()


def metric_expr(expr, label):
    """An expression names at least one metric, and only metrics pgtenant exports and documents."""
    names = set(re.findall(r"\bpgtenant_[a-z0-9_]+", expr))
    check(names, f"{label}: names no pgtenant metric: {expr}")
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in METRICS else name
        check(base in METRICS, f"{label}: {name} is not a metric pgtenant exports (proxy/src/metrics.rs)")
        check(f"`{base}`" in OPERATIONS, f"{label}: {base} is not documented in docs/operations.md")


def grafana(path):
    doc = json.load(open(path))
    exprs = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            exprs.extend((f"panel {p.get('title')!r}", t["expr"]) for t in p.get("targets", []))
    walk(doc.get("panels", []))
    for v in doc.get("templating", {}).get("list", []):
        q = v.get("query")
        if v.get("type") == "query":
            exprs.append((f"variable {v['name']}", q["query"] if isinstance(q, dict) else q))
    check(len(exprs) >= 10, f"{path}: only {len(exprs)} expressions")
    for where, expr in exprs:
        metric_expr(expr, f"grafana/{os.path.basename(path)} {where}")
    titles = " ".join(str(p.get("title", "")).lower() for p in doc.get("panels", []))
    for topic in ("transactions", "wait", "pool", "refusals", "logins", "top tenants", "ready"):
        check(topic in titles, f"{path}: no panel about {topic}")


def promtool():
    local = os.path.join(ROOT, "tests", "deploy", ".promtool", "promtool")
    return shutil.which("promtool") or (local if os.access(local, os.X_OK) else None)


def alerts(path):
    doc = yaml.safe_load(open(path))
    rules = [r for g in doc.get("groups", []) for r in g.get("rules", [])]
    names = {r.get("alert") for r in rules}
    for want in ("PgtenantNotReady", "PgtenantPoolExhausted", "PgtenantPoolWaitP99High", "PgtenantLoginFailuresSpike", "PgtenantJwksFetchFailing"):
        check(want in names, f"{path}: no alert {want}")
    for r in rules:
        label = f"prometheus/{os.path.basename(path)} {r.get('alert')}"
        check(set(r) <= {"alert", "expr", "for", "labels", "annotations"} and r.get("alert") and r.get("expr"), f"{label}: malformed rule {sorted(r)}")
        check(r.get("labels", {}).get("severity") in ("warning", "critical"), f"{label}: severity must be warning or critical")
        check(r.get("annotations", {}).get("summary"), f"{label}: no summary")
        check(re.fullmatch(r"\d+[smh]", str(r.get("for", "0m"))) is not None, f"{label}: bad for: {r.get('for')}")
        metric_expr(r.get("expr", ""), label)
    tool = promtool()
    if tool:
        for args in (["check", "rules", path], ["test", "rules", os.path.join(ROOT, "tests", "deploy", "alerts_test.yaml")]):
            r = subprocess.run([tool, *args], capture_output=True, text=True)
            check(r.returncode == 0, f"promtool {' '.join(args[:2])}: {r.stdout.strip()} {r.stderr.strip()}")
    else:
        print("promtool not found: alert rules checked for structure only")


def dockerfile(path):
    lines = [l.strip() for l in open(path) if l.strip() and not l.startswith("#")]
    check(sum(l.startswith("FROM ") for l in lines) >= 2, "Dockerfile: not multi-stage")
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    check(users and users[-1] not in ("0", "root"), "Dockerfile: must end as a non-root USER")
    check(any(l.startswith("COPY --from=") and l.split()[-1] == IMAGE_BINARY for l in lines), f"Dockerfile: pgtenant not installed at {IMAGE_BINARY}")
    for l in lines:
        if l.startswith("COPY ") and "--from" not in l:
            for src in l.split()[1:-1]:
                check(os.path.exists(os.path.join(ROOT, src)), f"Dockerfile: COPY source {src} missing")


for name in sorted(os.listdir(os.path.join(DEPLOY, "kubernetes"))):
    kubernetes(os.path.join(DEPLOY, "kubernetes", name))
compose(os.path.join(DEPLOY, "compose.yaml"))
dockerfile(os.path.join(DEPLOY, "Dockerfile"))
grafana(os.path.join(DEPLOY, "grafana", "pgtenant.json"))
alerts(os.path.join(DEPLOY, "prometheus", "alerts.yaml"))
for f in failures:
    print("FAIL", f)
print(f"deploy: {len(failures)} problems")
sys.exit(1 if failures else 0)
