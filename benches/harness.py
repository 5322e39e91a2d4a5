#!/usr/bin/env python3
"""Drives the macro benches: benches/data-plane.sh, benches/soak.sh,
benches/hedge.sh and benches/cold-start.sh (in cold_start.py).

Starts every process itself (backends, weft-proxy sidecars, nginx, HAProxy),
pins them with taskset, runs weft-load against each target in turns, reads CPU
time and memory from /proc, and writes a JSON file and a markdown report.
Everything listens on 127.0.0.1 only.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "0"
LOAD_CPU = "1"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def port_open(addr):
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


class Procs:
    """Processes started by the harness, ended by it (only those)."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, cpu=None, **kw):
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", cpu] + cmd
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def stop(self, p, timeout=10):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in reversed(self.procs):
            try:
                self.stop(p, timeout=5)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


# ---- /proc readings -------------------------------------------------------


def children(pid):
    """Direct children of pid (nginx's workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads), seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): utime is field 14, stime 15.
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# ---- targets --------------------------------------------------------------


class Target:
    """A path the load goes through: its load-generator arguments and the
    proxy processes whose CPU and memory are measured."""

    def __init__(self, name, title, load_targets, host="bench"):
        self.name = name
        self.title = title
        self.load_targets = load_targets
        self.host = host
        self.roots = []  # (label, Popen) of the proxy processes

    def pids(self):
        out = []
        for _, p in self.roots:
            out.append(p.pid)
            out.extend(children(p.pid))
        return out

    def rss_kb(self, key):
        """{label: kB} for each proxy process (with its children summed)."""
        out = {}
        for label, p in self.roots:
            out[label] = status_kb(p.pid, key) + sum(status_kb(c, key) for c in children(p.pid))
        return out


def start_backends(procs, bindir, n=3):
    addrs = []
    for _ in range(n):
        p = procs.start([f"{bindir}/weft-bench-backend"], cpu=LOAD_CPU, stdout=subprocess.PIPE, text=True)
        addrs.append(p.stdout.readline().strip())
    return addrs


def round_robin_policy(work, name="bench"):
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'service = "{name}"\n\n[outbound]\nload_balancer = "round-robin"\n')
    return f"{name}.toml"


def start_weft(procs, bindir, work, tag, toml_body, exe=None):
    """One weft-proxy on CPU 0; returns (Popen, bound addresses, config path)."""
    cfg = os.path.join(work, f"{tag}.toml")
    bound = os.path.join(work, f"{tag}.bound.json")
    with open(cfg, "w") as f:
        f.write(toml_body)
    env = dict(os.environ, WEFT_LOG="warn")
    errlog = open(os.path.join(work, f"{tag}.log"), "w")
    p = procs.start(
        [exe or f"{bindir}/weft-proxy", "run", "--config", cfg, "--bound-file", bound],
        cpu=PROXY_CPU,
        env=env,
        stdout=errlog,
        stderr=errlog,
    )

    def ready():
        if p.poll() is not None:
            raise RuntimeError(f"weft-proxy {tag} exited; see {errlog.name}")
        try:
            with open(bound) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    return p, wait_for(ready, f"weft-proxy {tag}"), cfg


LISTEN_LOCAL = '[listen]\noutbound = "127.0.0.1:0"\ninbound = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\n'


def caller_toml(endpoints, services=(("bench", True),), mesh_tls=False):
    """A caller sidecar's bootstrap: `services` (name, with the bench policy?)
    each with `endpoints`; with `mesh_tls`, reached over mTLS (`tls = "mesh"`)."""
    body = LISTEN_LOCAL
    for name, rr in services:
        eps = ", ".join(f'{{ address = "{a}" }}' for a in endpoints)
        body += f'\n[[directory.services]]\nname = "{name}"\n'
        if rr:
            body += 'policy = "bench.toml"\n'
        if mesh_tls:
            body += 'tls = "mesh"\n'
        body += f"endpoints = [ {eps} ]\n"
    return body


def server_toml(app):
    return f'[service]\nname = "bench"\napp = "{app}"\n\n' + LISTEN_LOCAL


def weft_one_hop(procs, bindir, work, backends, exe=None, name="weft", title="Weft, one sidecar hop"):
    round_robin_policy(work)
    p, bound, _ = start_weft(procs, bindir, work, name, caller_toml(backends), exe=exe)
    t = Target(name, title, [bound["outbound"]])
    t.roots.append(("sidecar", p))
    return t


def start_servers(procs, bindir, work, backends, prefix="server", extra=""):
    servers = []
    for i, app in enumerate(backends):
        p, bound, _ = start_weft(procs, bindir, work, f"{prefix}-{i}", server_toml(app) + extra)
        servers.append((p, bound["inbound"]))
    return servers


def mesh_certs(bindir, work):
    """A development CA and two identities, `bench` (the server sidecars) and
    `load` (the caller), from `weftctl certs`; returns their `[tls]` sections."""
    certs = os.path.join(work, "certs")
    subprocess.run([f"{bindir}/weftctl", "certs", "ca", "--out", certs], check=True, stdout=subprocess.DEVNULL)
    for ident in ("bench", "load"):
        subprocess.run([f"{bindir}/weftctl", "certs", "issue", ident, "--ca", certs, "--out", certs],
                       check=True, stdout=subprocess.DEVNULL)
    return {ident: f'\n[tls]\nca = "{certs}/ca.pem"\ncert = "{certs}/{ident}.pem"\nkey = "{certs}/{ident}-key.pem"\n'
            for ident in ("bench", "load")}


def weft_mesh(procs, bindir, work, backends, mtls=False):
    """The mesh path, plaintext: a caller sidecar balancing over 3 server
    sidecars, each in front of one backend, HTTP/1.1 between the sidecars (four
    sidecars on the proxy core). With `mtls`, as the mTLS targets define it: a
    caller sidecar and one server sidecar (both on the proxy core) in front of
    one backend, TLS 1.3 and one multiplexed HTTP/2 connection between them."""
    round_robin_policy(work)
    tls = mesh_certs(bindir, work) if mtls else {"bench": "", "load": ""}
    prefix = "mtls-" if mtls else ""
    apps = backends[:1] if mtls else backends
    servers = start_servers(procs, bindir, work, apps, prefix=f"{prefix}server", extra=tls["bench"])
    body = caller_toml([s[1] for s in servers], mesh_tls=mtls) + tls["load"]
    p, bound, _ = start_weft(procs, bindir, work, f"{prefix}mesh-caller", body)
    if mtls:
        t = Target("mesh-mtls", "Weft mesh path with mTLS (caller sidecar -> server sidecar, HTTP/2 over TLS 1.3)",
                   [bound["outbound"]])
    else:
        t = Target("mesh", "Weft mesh path (caller sidecar -> 3 server sidecars)", [bound["outbound"]])
    t.roots.append(("caller", p))
    for i, (sp, _) in enumerate(servers):
        t.roots.append((f"server-{i}", sp))
    return t


def nginx_command(work, backends, name="nginx"):
    """Writes an nginx config (1 worker, an upstream of `backends`, keep-alive
    both sides) under work/name; returns (command, port)."""
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    prefix = os.path.join(work, name)
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    servers = "".join(f"    server {a};\n" for a in backends)
    conf = f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  upstream bench {{
{servers}    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    return [exe, "-p", prefix, "-e", f"{prefix}/logs/error.log", "-c", path], port


def nginx(procs, work, backends):
    cmd, port = nginx_command(work, backends)
    errlog = open(os.path.join(work, "nginx", "stderr.log"), "w")
    p = procs.start(cmd, cpu=PROXY_CPU, stdout=errlog, stderr=errlog)
    addr = f"127.0.0.1:{port}"
    wait_for(lambda: p.poll() is None and port_open(addr), "nginx")
    t = Target("nginx", "nginx (1 worker)", [addr])
    t.roots.append(("master+worker", p))
    return t


def haproxy_command(work, backends, name="haproxy"):
    """Writes an HAProxy config (`nbthread 1`, round robin over `backends`,
    keep-alive both sides) to work/name.cfg; returns (command, port)."""
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = free_port()
    servers = "".join(f"  server s{i} {a}\n" for i, a in enumerate(backends))
    conf = f"""global
  nbthread 1
  maxconn 4096

defaults
  mode http
  timeout connect 1s
  timeout client 120s
  timeout server 120s

frontend fe
  bind 127.0.0.1:{port}
  default_backend be

backend be
  balance roundrobin
{servers}"""
    path = os.path.join(work, f"{name}.cfg")
    with open(path, "w") as f:
        f.write(conf)
    return [exe, "-db", "-f", path], port


def haproxy(procs, work, backends):
    cmd, port = haproxy_command(work, backends)
    errlog = open(os.path.join(work, "haproxy.log"), "w")
    p = procs.start(cmd, cpu=PROXY_CPU, stdout=errlog, stderr=errlog)
    addr = f"127.0.0.1:{port}"
    wait_for(lambda: p.poll() is None and port_open(addr), "haproxy")
    t = Target("haproxy", "HAProxy (nbthread 1)", [addr])
    t.roots.append(("process", p))
    return t


# ---- load runs --------------------------------------------------------------


def run_load(bindir, target, label, connections, seconds, warmup, rate=None, interval=None, stream=None):
    cmd = [f"{bindir}/weft-load", "--host", target.host, "--connections", str(connections),
           "--duration", str(seconds), "--warmup", str(warmup), "--label", label]
    for a in target.load_targets:
        cmd += ["--target", a]
    if rate:
        cmd += ["--rate", str(rate)]
    if interval:
        cmd += ["--interval", str(interval)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", LOAD_CPU] + cmd
    pids = target.pids()
    cpu0 = cpu_seconds(pids) if pids else 0.0
    # The proxy processes' RSS (summed) sampled while the load runs: the largest
    # sample is this load shape's memory, where VmHWM is the peak over all runs.
    rss_max = [0]
    running = threading.Event()
    running.set()

    def sample_rss():
        while running.is_set():
            try:
                rss_max[0] = max(rss_max[0], sum(status_kb(pid, "VmRSS") for pid in pids))
            except OSError:  # a process gone: the run fails below
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    if pids:
        sampler.start()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
            if stream:
                stream(lines[-1])
    code = p.wait()
    running.clear()
    if pids:
        sampler.join()
    if code != 0:
        raise RuntimeError(f"weft-load failed for {label}")
    wall = time.monotonic() - t0
    result = lines[-1]
    if pids:
        result["rss_kb"] = rss_max[0]
        cpu = cpu_seconds(pids) - cpu0
        result["proxy_cpu_s"] = cpu
        result["proxy_cpu_util"] = cpu / wall
        n = result["finished_all"]
        result["cpu_ms_per_10k"] = cpu * 1000 * 10000 / n if n else None
        result["rps_per_core"] = n / cpu if cpu > 0 else None
    return result


def load_avg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---- data-plane ---------------------------------------------------------------


def idle_rss(procs, bindir, work, backends, services=100):
    """A caller sidecar with `services` services of 3 endpoints each."""
    sub = os.path.join(work, "idle")
    os.makedirs(sub, exist_ok=True)
    round_robin_policy(sub)
    body = caller_toml(backends, [(f"svc-{i:03}", False) for i in range(services)])
    p, bound, _ = start_weft(procs, bindir, sub, "idle", body)
    time.sleep(2)
    at_start = status_kb(p.pid, "VmRSS")
    split_start = {k: status_kb(p.pid, k) for k in ("RssAnon", "RssFile")}
    # One request to each service: its balancer, pool and metrics series exist now.
    host, port = bound["outbound"].rsplit(":", 1)
    import http.client

    for i in range(services):
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/", headers={"Host": f"svc-{i:03}"})
        r = c.getresponse()
        r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"svc-{i:03}: {r.status}")
    time.sleep(2)
    after = status_kb(p.pid, "VmRSS")
    split_after = {k: status_kb(p.pid, k) for k in ("RssAnon", "RssFile")}
    procs.stop(p)
    return {"services": services, "endpoints_per_service": 3,
            "rss_start_kb": at_start, "rss_after_one_request_each_kb": after,
            "start_split_kb": split_start, "after_split_kb": split_after}


def data_plane(args):
    bindir = args.bin
    work = tempfile.mkdtemp(prefix="weft-dp-")
    procs = Procs()
    try:
        backends = start_backends(procs, bindir)
        direct = Target("direct", "direct (load generator -> 3 backends)", backends)
        targets = [
            direct,
            weft_one_hop(procs, bindir, work, backends),
            weft_mesh(procs, bindir, work, backends),
            weft_mesh(procs, bindir, work, backends, mtls=True),
            nginx(procs, work, backends),
            haproxy(procs, work, backends),
        ]
        baseline = os.environ.get("WEFT_PROXY_BASELINE")
        if baseline:
            # Another weft-proxy build (e.g. before a change), one hop, for before/after.
            targets.insert(2, weft_one_hop(procs, bindir, work, backends, exe=baseline, name="weft-baseline",
                                           title=f"Weft one hop, baseline build ({os.path.basename(baseline)})"))
        only = set(args.targets.split(",")) if args.targets else None
        if only:
            targets = [t for t in targets if t.name in only]
        rates = [int(r) for r in args.rates.split(",") if r]
        conns = [int(c) for c in str(args.connections).split(",") if c]
        log(f"backends {backends}; {args.rounds} rounds x {len(targets)} targets ({' '.join(t.name for t in targets)}); "
            f"closed loop {conns} connections {args.seconds}s, open loop {rates} req/s {args.seconds}s")
        runs = []
        for rnd in range(1, args.rounds + 1):
            for t in targets:
                for c in conns:
                    la = load_avg()
                    r = run_load(bindir, t, t.name, c, args.seconds, args.warmup)
                    r.update(target=t.name, round=rnd, mode=f"max{c}", loadavg=la)
                    runs.append(r)
                    log(f"round {rnd} {t.name:8} max {c:3}c {r['rps']:9.0f} req/s  p99 {r['p99_ms']:.3f} ms"
                        + (f"  proxy cpu {r['proxy_cpu_util']*100:.0f}%" if "proxy_cpu_util" in r else "")
                        + f"  errors {r['errors']}  load {la:.2f}")
                for rate in rates:
                    r = run_load(bindir, t, t.name, args.open_connections, args.seconds, args.warmup, rate=rate)
                    r.update(target=t.name, round=rnd, mode=f"rate{rate}", loadavg=load_avg())
                    runs.append(r)
                    log(f"round {rnd} {t.name:8} {rate:5} p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} "
                        f"p99.9 {r['p999_ms']:.3f} ms  errors {r['errors']}  pacer lag p99 {r['pacer_lag_p99_ms']:.3f}")
        peaks = {t.name: t.rss_kb("VmHWM") for t in targets}
        idle = idle_rss(procs, bindir, work, backends) if not only or "weft" in only else None
    finally:
        procs.stop_all()
    report = summarise(args, targets, runs, peaks, rates, conns, idle)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data-plane.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "data-plane.md"), "w") as f:
        f.write(md)
    print(md)
    import plot

    for path in plot.data_plane(report, args.out):
        log(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


def machine():
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "CPU max MHz"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    info["kernel"] = os.uname().release
    return info


def versions():
    v = {}
    for name, cmd in (("nginx", ["nginx", "-v"]), ("haproxy", ["haproxy", "-v"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
            v[name] = (out.stdout + out.stderr).splitlines()[0].strip()
        except (OSError, IndexError):
            pass
    return v


def summarise(args, targets, runs, peaks, rates, conns, idle):
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "versions": versions(),
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "warmup": args.warmup,
                     "connections_closed_loop": conns,
                     "connections_open_loop": args.open_connections, "rates": rates,
                     "pinning": "proxies on CPU 0; load generator and the 3 backends on CPU 1"},
        "targets": {},
        "runs": runs,
        "idle_rss": idle,
    }
    for t in targets:
        mine = [r for r in runs if r["target"] == t.name]
        s = {"title": t.title, "peak_rss_kb": peaks.get(t.name), "closed": {}, "rates": {}}
        for c in conns:
            maxr = [r for r in mine if r["mode"] == f"max{c}"]
            s["closed"][str(c)] = {
                "max_rps": med([r["rps"] for r in maxr]),
                "errors": sum(r["errors"] for r in maxr),
                "proxy_cpu_util": med([r.get("proxy_cpu_util") for r in maxr]),
                "rps_per_core": med([r.get("rps_per_core") for r in maxr]),
                "cpu_ms_per_10k": med([r.get("cpu_ms_per_10k") for r in maxr]),
                "p99_ms": med([r["p99_ms"] for r in maxr]),
                # The first round's: the heap seldom shrinks, so later rounds
                # at fewer connections would show what 256 left behind.
                "rss_kb": med([r.get("rss_kb") for r in maxr if r["round"] == 1]),
            }
        for rate in rates:
            rr = [r for r in mine if r["mode"] == f"rate{rate}"]
            curves = [r.get("percentiles_ms") for r in rr if r.get("percentiles_ms")]
            s["rates"][str(rate)] = {
                **{k: med([r.get(k) for r in rr]) for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "p9999_ms", "rps")},
                "percentiles_ms": {p: statistics.median(c[p] for c in curves) for p in curves[0]} if curves else None,
                "errors": sum(r["errors"] for r in rr),
                "cpu_ms_per_10k": med([r.get("cpu_ms_per_10k") for r in rr]),
                "pacer_lag_p99_ms": med([r["pacer_lag_p99_ms"] for r in rr]),
            }
        out["targets"][t.name] = s
    d = out["targets"].get("direct")
    if d:
        for name, s in out["targets"].items():
            for rate, x in s["rates"].items():
                base = d["rates"][rate]
                x["added_ms"] = {k: x[k]["median"] - base[k]["median"] for k in ("p50_ms", "p99_ms")}
    return out


def fmt_range(m, f="{:.0f}"):
    if not m:
        return "-"
    return f"{f.format(m['median'])} ({f.format(m['min'])}-{f.format(m['max'])})"


def ratio(a, b, f="{:.2f}"):
    if a is None or b in (None, 0):
        return "-"
    return f.format(a / b)


def markdown(rep):
    T = rep["targets"]
    rates = rep["settings"]["rates"]
    conns = rep["settings"]["connections_closed_loop"]
    lines = []
    m = rep["machine"]
    st = rep["settings"]
    lines.append(f"Data-plane bench, {rep['date']}: {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs; "
                 f"{st['pinning']}; {st['rounds']} rounds of every path in turn, {st['seconds']} s per run "
                 f"(+{st['warmup']} s warm-up); closed loop with {', '.join(map(str, conns))} connections, "
                 f"open loop {st['connections_open_loop']} connections. Median of the rounds (min-max).")
    lines.append("")
    lines.append("Closed loop (requests back to back): max req/s, the proxy's CPU use, and req/s per proxy core "
                 "(requests / the proxy processes' CPU seconds).")
    lines.append("")
    head, sep = "| path |", "|---|"
    for c in conns:
        head += f" {c} conn: max req/s | CPU | req/s per core |"
        sep += "---|---|---|"
    head += " peak RSS MB |"
    sep += "---|"
    lines += [head, sep]
    for name, s in T.items():
        peak = s["peak_rss_kb"]
        if peak:
            total = sum(peak.values()) / 1024
            rss = f"{total:.1f}" if len(peak) == 1 else f"{total:.1f} ({' + '.join(f'{v/1024:.1f}' for v in peak.values())})"
        else:
            rss = "-"
        row = f"| {s['title']} |"
        for c in conns:
            x = s["closed"][str(c)]
            util = x["proxy_cpu_util"]
            util = "-" if not util else f"{util['median'] * 100:.0f}%"
            row += f" {fmt_range(x['max_rps'])} | {util} | {fmt_range(x['rps_per_core'])} |"
        lines.append(row + f" {rss} |")
    lines.append("")
    lines.append("Open loop (a fixed rate, latency from each request's scheduled time), ms; "
                 "CPU ms the proxy processes spent per 10,000 requests.")
    lines.append("")
    head, sep = "| path |", "|---|"
    for rate in rates:
        head += f" {rate:,} req/s: p50 / p90 / p99 / p99.9 / p99.99 | added p50 / p99 | CPU per 10k |"
        sep += "---|---|---|"
    lines += [head, sep]
    for name, s in T.items():
        row = f"| {s['title']} |"
        for rate in rates:
            x = s["rates"][str(rate)]
            cells = [x[k]["median"] if x.get(k) else None for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "p9999_ms")]
            row += " " + " / ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |"
            a = x.get("added_ms")
            row += " - |" if name == "direct" or not a else f" {a['p50_ms']:+.3f} / {a['p99_ms']:+.3f} |"
            row += f" {fmt_range(x['cpu_ms_per_10k'], '{:.0f}')} |"
        lines.append(row)
    lines.append("")
    errors = {n: sum(x["errors"] for x in s["closed"].values()) + sum(x["errors"] for x in s["rates"].values())
              for n, s in T.items()}
    lines.append("Errors: " + ", ".join(f"{n} {e}" for n, e in errors.items()) + ".")
    lag = max((x["pacer_lag_p99_ms"]["median"] for s in T.values() for x in s["rates"].values()
               if x.get("pacer_lag_p99_ms")), default=0)
    lines.append(f"Open-loop latency runs from each request's scheduled time (the pacer's own p99 lateness, "
                 f"included in every figure alike: {lag:.3f} ms).")
    lines.append("")
    # Ratios of the Weft paths to the others (> 1: Weft's figure is larger).
    refs = [n for n in ("direct", "nginx", "haproxy") if n in T]
    weft = [n for n in ("weft", "mesh", "mesh-mtls") if n in T]
    if weft and refs:
        metrics = [
            *[(f"req/s per proxy core, {c} connections", lambda s, c=c: s["closed"][str(c)]["rps_per_core"])
              for c in conns],
            *[(f"{q} at {r:,} req/s", lambda s, r=r, k=k: s["rates"][str(r)].get(k))
              for r in rates for q, k in (("p99", "p99_ms"), ("p99.9", "p999_ms"))],
            *[(f"CPU per request at {r:,} req/s", lambda s, r=r: s["rates"][str(r)]["cpu_ms_per_10k"]) for r in rates],
            ("peak RSS", lambda s: {"median": sum(s["peak_rss_kb"].values())} if s["peak_rss_kb"] else None),
        ]
        short = {"weft": "one hop", "mesh": "mesh path", "mesh-mtls": "mesh mTLS"}
        cols = [(w, r) for w in weft for r in refs]
        lines.append("Ratios, Weft / other (medians; for req/s per core higher is better, for the rest lower):")
        lines.append("")
        lines.append("| figure |" + "".join(f" {short[w]} / {r} |" for w, r in cols))
        lines.append("|---|" + "---|" * len(cols))
        for label, get in metrics:
            row = f"| {label} |"
            for w, r in cols:
                a, b = get(T[w]), get(T[r])
                row += f" {ratio(a and a['median'], b and b['median'])} |"
            lines.append(row)
    if "weft" in T and any(n in T for n in ("mesh", "mesh-mtls")) and "direct" in T:
        lines.append("")
        lines.append("Added latency of the mesh paths / one plaintext hop's (each path's percentile minus the "
                     "direct path's, medians):")
        lines.append("")
        meshes = [n for n in ("mesh", "mesh-mtls") if n in T]
        lines.append("| rate |" + "".join(f" {short[n]} added p50 / p99 ms | / one hop's |" for n in meshes))
        lines.append("|---|" + "---|---|" * len(meshes))
        for r in rates:
            hop = T["weft"]["rates"][str(r)].get("added_ms")
            row = f"| {r:,} req/s |"
            for n in meshes:
                a = T[n]["rates"][str(r)].get("added_ms")
                if not a or not hop:
                    row += " - | - |"
                    continue
                row += (f" {a['p50_ms']:+.3f} / {a['p99_ms']:+.3f} |"
                        f" {ratio(a['p50_ms'], hop['p50_ms'])} / {ratio(a['p99_ms'], hop['p99_ms'])} |")
            lines.append(row)
    if any(x.get("rss_kb") for s in T.values() for x in s["closed"].values()):
        lines.append("")
        lines.append("Memory by load shape: the proxy processes' RSS, summed, the largest of samples every 0.2 s "
                     "during each closed-loop run of the first round (connection counts in increasing order; "
                     "later rounds would show the memory the largest count left behind), MB:")
        lines.append("")
        lines.append("| path |" + "".join(f" {c} conn |" for c in conns) + " peak (VmHWM) |")
        lines.append("|---|" + "---|" * (len(conns) + 1))
        for name, s in T.items():
            if not s["peak_rss_kb"]:
                continue
            row = f"| {s['title']} |"
            for c in conns:
                x = s["closed"][str(c)].get("rss_kb")
                row += " - |" if not x else f" {x['median'] / 1024:.1f} |"
            lines.append(row + f" {sum(s['peak_rss_kb'].values()) / 1024:.1f} |")
    if "weft-baseline" in T and "weft" in T:
        a, b = T["weft"], T["weft-baseline"]
        parts = []
        for c in conns:
            x, y = a["closed"][str(c)], b["closed"][str(c)]
            parts.append(f"req/s per proxy core at {c} connections "
                         f"{ratio((x['rps_per_core'] or {}).get('median'), (y['rps_per_core'] or {}).get('median'))}")
        for r in rates:
            x, y = a["rates"][str(r)], b["rates"][str(r)]
            parts.append(f"CPU per request at {r:,} req/s "
                         f"{ratio((x['cpu_ms_per_10k'] or {}).get('median'), (y['cpu_ms_per_10k'] or {}).get('median'))}, "
                         f"p99 {ratio(x['p99_ms']['median'], y['p99_ms']['median'])}")
        lines.append("")
        lines.append("This build / the baseline build, one hop: " + "; ".join(parts) + ".")
    idle = rep.get("idle_rss")
    if idle:
        lines.append("")
        lines.append(f"Idle RSS of a sidecar with {idle['services']} services ({idle['endpoints_per_service']} "
                     f"endpoints each) in its directory: {idle['rss_start_kb']/1024:.1f} MB after start, "
                     f"{idle['rss_after_one_request_each_kb']/1024:.1f} MB after one request to each service"
                     + (f" (of which heap and stacks, RssAnon: {idle['start_split_kb']['RssAnon']/1024:.1f} and "
                        f"{idle['after_split_kb']['RssAnon']/1024:.1f} MB; the rest is the binary's mapped pages, RssFile)"
                        if "start_split_kb" in idle else "") + ".")
    lines.append("")
    lines.append("Plots: `data-plane-rps-per-core.svg`, " + ", ".join(f"`data-plane-latency-{r}.svg`" for r in rates) + ".")
    return "\n".join(lines) + "\n"


# ---- soak -------------------------------------------------------------------


def admin_post(addr, path):
    req = urllib.request.Request(f"http://{addr}{path}", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def soak(args):
    bindir = args.bin
    work = tempfile.mkdtemp(prefix="weft-soak-")
    procs = Procs()
    minute_rows = []
    churn = {"reloads": 0, "started": 0, "stopped": 0, "reload_failures": 0}
    try:
        backends = start_backends(procs, bindir, 4)
        round_robin_policy(work)
        # Four instances of "bench", each a sidecar in front of its own backend;
        # three are in the caller's directory at any time.
        pool = [start_servers(procs, bindir, work, [b], prefix=f"server-{i}-gen0")[0] + (i,)
                for i, b in enumerate(backends)]
        serving = pool[:3]
        spare = pool[3]
        caller, bound, cfg = start_weft(procs, bindir, work, "caller",
                                        caller_toml([s[1] for s in serving]))
        target = Target("mesh", "mesh", [bound["outbound"]])
        admin = bound["admin"]
        gen = [1]

        def rss():
            out = {"caller": status_kb(caller.pid, "VmRSS")}
            for i, (p, _, idx) in enumerate(serving):
                out[f"server-{idx}"] = status_kb(p.pid, "VmRSS")
            return out

        def on_interval(row):
            row["rss_kb"] = rss()
            row["caller_hwm_kb"] = status_kb(caller.pid, "VmHWM")
            row["churn"] = dict(churn)
            minute_rows.append(row)
            log(f"minute {row['interval']:3}: {row['requests']:7} ok, {row['errors']} errors, p50 {row['p50_ms']:.3f} "
                f"p99 {row['p99_ms']:.3f} p99.9 {row['p999_ms']:.3f} ms, caller RSS {row['rss_kb']['caller']/1024:.1f} MB, "
                f"churn {churn['reloads']} reloads")

        # The load runs in a thread; churn happens here meanwhile.
        result = {}

        def load():
            result["total"] = run_load(bindir, target, "soak", args.connections, args.minutes * 60, 5,
                                       rate=args.rate, interval=60, stream=lambda r: r["kind"] == "interval" and on_interval(r))

        th = threading.Thread(target=load)
        th.start()
        time.sleep(5)
        while th.is_alive():
            th.join(args.churn_every)
            if not th.is_alive():
                break
            # An instance leaves and another joins: the leaving one is first
            # taken out of the caller's directory (reload), then stopped; a new
            # sidecar process is started for the spare backend and added.
            leaving = serving.pop(0)
            idx = spare[2]
            joining = start_servers(procs, bindir, work, [backends[idx]], prefix=f"server-{idx}-gen{gen[0]}")[0] + (idx,)
            gen[0] += 1
            churn["started"] += 1
            serving.append(joining)
            with open(cfg, "w") as f:
                f.write(caller_toml([s[1] for s in serving]))
            try:
                admin_post(admin, "/reload")
                churn["reloads"] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                churn["reload_failures"] += 1
                log(f"reload failed: {e}")
            time.sleep(1)
            procs.stop(leaving[0])
            churn["stopped"] += 1
            spare = leaving
        th.join()
        total = result["total"]
    finally:
        procs.stop_all()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "minutes": args.minutes,
              "rate": args.rate, "churn_every_s": args.churn_every, "churn": churn, "total": total,
              "minutes_rows": minute_rows}
    warm = [r for r in minute_rows if r["interval"] > 1]
    if len(warm) >= 2:
        first, last = warm[0], warm[-1]
        report["drift_after_warmup"] = {
            "from_minute": first["interval"], "to_minute": last["interval"],
            "caller_rss_mb": [first["rss_kb"]["caller"] / 1024, last["rss_kb"]["caller"] / 1024],
            "p99_ms": [first["p99_ms"], last["p99_ms"]],
            "p50_ms": [first["p50_ms"], last["p50_ms"]],
        }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = soak_markdown(report)
    with open(os.path.join(args.out, "soak.md"), "w") as f:
        f.write(md)
    print(md)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if total["errors"] == 0 else 1


def soak_markdown(rep):
    lines = [f"Soak, {rep['date']}: {rep['minutes']} min at {rep['rate']:,} req/s (open loop) through the mesh path "
             f"(caller sidecar -> server sidecars -> backends); an instance left and another joined every "
             f"{rep['churn_every_s']} s ({rep['churn']['reloads']} reloads, {rep['churn']['reload_failures']} failed).",
             "",
             "| minute | requests | errors | p50 ms | p99 ms | p99.9 ms | max ms | caller RSS MB | server RSS MB (each) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["minutes_rows"]:
        servers = " / ".join(f"{v/1024:.1f}" for k, v in r["rss_kb"].items() if k != "caller")
        lines.append(f"| {r['interval']} | {r['requests']:,} | {r['errors']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['p999_ms']:.3f} | {r['max_ms']:.3f} | {r['rss_kb']['caller']/1024:.1f} | {servers} |")
    t = rep["total"]
    lines.append("")
    lines.append(f"Whole run: {t['requests']:,} requests, {t['errors']} errors, p50 {t['p50_ms']:.3f} ms, "
                 f"p99 {t['p99_ms']:.3f} ms, p99.9 {t['p999_ms']:.3f} ms, max {t['max_ms']:.3f} ms.")
    d = rep.get("drift_after_warmup")
    if d:
        lines.append(f"Drift after warm-up (minute {d['from_minute']} to {d['to_minute']}): caller RSS "
                     f"{d['caller_rss_mb'][0]:.1f} -> {d['caller_rss_mb'][1]:.1f} MB, p50 {d['p50_ms'][0]:.3f} -> "
                     f"{d['p50_ms'][1]:.3f} ms, p99 {d['p99_ms'][0]:.3f} -> {d['p99_ms'][1]:.3f} ms.")
    return "\n".join(lines) + "\n"


def metric_sum(addr, name, **labels):
    """The sum of `name`'s samples with `labels` on a sidecar's /metrics."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


HEDGE_CASES = (
    ("none", "without hedging", ""),
    ("fixed", 'hedge = { after = "10ms" }', 'hedge = { after = "10ms" }\n'),
    ("p95", 'hedge = { after = "p95" }', 'hedge = { after = "p95" }\n'),
)


def hedge(args):
    """Open-loop latency through one sidecar to three backends, one of which
    answers every `slow_every`-th request `slow_ms` late, without hedging and
    with each hedge setting (a fresh sidecar per case, default retry budget)."""
    bindir = args.bin
    work = tempfile.mkdtemp(prefix="weft-hedge-")
    procs = Procs()
    rows = []
    try:
        slow = procs.start(
            [f"{bindir}/weft-bench-backend", "--slow-every", str(args.slow_every), "--slow-ms", str(args.slow_ms)],
            cpu=LOAD_CPU, stdout=subprocess.PIPE, text=True,
        )
        backends = [slow.stdout.readline().strip()] + start_backends(procs, bindir, 2)
        for name, title, key in HEDGE_CASES:
            with open(os.path.join(work, "bench.toml"), "w") as f:
                f.write('service = "bench"\n\n[outbound]\nload_balancer = "round-robin"\n\n'
                        f'[[routes]]\nname = "all"\n{key}')
            p, bound, _ = start_weft(procs, bindir, work, f"hedge-{name}", caller_toml(backends))
            t = Target(name, title, [bound["outbound"]])
            t.roots.append(("sidecar", p))
            log(f"hedge: {title}, {args.rate} req/s for {args.seconds}s")
            r = run_load(bindir, t, name, args.connections, args.seconds, args.warmup, rate=args.rate)
            r["title"] = title
            r["hedges"] = {o: metric_sum(bound["admin"], "weft_hedges_total", outcome=o)
                           for o in ("sent", "won", "lost", "no-budget", "no-endpoint")}
            r["sidecar_requests"] = metric_sum(bound["admin"], "weft_requests_total", direction="outbound")
            rows.append(r)
            procs.stop(p)
    finally:
        procs.stop_all()
    rep = {"machine": machine(), "load_avg": load_avg(), "rate": args.rate, "seconds": args.seconds,
           "connections": args.connections, "slow_every": args.slow_every, "slow_ms": args.slow_ms, "runs": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hedge.json"), "w") as f:
        json.dump(rep, f, indent=1)
    md = hedge_markdown(rep)
    with open(os.path.join(args.out, "hedge.md"), "w") as f:
        f.write(md)
    print(md)


def hedge_markdown(rep):
    out = [
        f"Open loop, {rep['rate']} req/s over {rep['connections']} connections for {rep['seconds']} s "
        f"through one sidecar (round-robin) to three backends; one answers every {rep['slow_every']}th "
        f"request it gets {rep['slow_ms']} ms late (about 1 in {3 * rep['slow_every']} of all requests). "
        f"Load average at the end: {rep['load_avg']:.2f}. Latency from each request's scheduled send time, ms.",
        "",
        "| route | p50 | p99 | p99.9 | max | errors | hedges sent | won | lost | no budget | extra load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["runs"]:
        h = r["hedges"]
        n = r.get("finished_all") or r.get("requests") or 0
        extra = f"{100 * h['sent'] / n:.1f}%" if n else "-"
        out.append(
            f"| {r['title']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['max_ms']:.1f} | "
            f"{r.get('errors', 0)} | {h['sent']:.0f} | {h['won']:.0f} | {h['lost']:.0f} | {h['no-budget']:.0f} | {extra} |"
        )
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    dp = sub.add_parser("data-plane")
    dp.add_argument("--rounds", type=int, default=3)
    dp.add_argument("--seconds", type=float, default=10)
    dp.add_argument("--warmup", type=float, default=1)
    dp.add_argument("--connections", default="16,64,256", help="closed-loop connection counts, comma-separated")
    dp.add_argument("--open-connections", type=int, default=64)
    dp.add_argument("--rates", default="1000,2000,5000")
    dp.add_argument("--targets", default="", help="comma-separated subset: direct,weft,mesh,mesh-mtls,nginx,haproxy")
    sk = sub.add_parser("soak")
    sk.add_argument("--minutes", type=float, default=30)
    sk.add_argument("--rate", type=int, default=2000)
    sk.add_argument("--connections", type=int, default=64)
    sk.add_argument("--churn-every", type=float, default=10)
    cs = sub.add_parser("cold-start")
    cs.add_argument("--rounds", type=int, default=20)
    cs.add_argument("--cases", default="", help="comma-separated subset: weft-static,weft-cp-live,weft-cp-cache,haproxy,nginx")
    hg = sub.add_parser("hedge")
    hg.add_argument("--rate", type=int, default=500)
    hg.add_argument("--seconds", type=float, default=20)
    hg.add_argument("--warmup", type=float, default=2)
    hg.add_argument("--connections", type=int, default=32)
    hg.add_argument("--slow-every", type=int, default=10)
    hg.add_argument("--slow-ms", type=int, default=100)
    args = ap.parse_args()
    if args.cmd == "hedge":
        hedge(args)
        return 0
    if args.cmd == "data-plane":
        data_plane(args)
        return 0
    if args.cmd == "cold-start":
        import cold_start

        cold_start.run(args)
        return 0
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
