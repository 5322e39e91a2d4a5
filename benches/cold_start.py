"""Cold start: the time from `exec` of a proxy to its first proxied response.

Run by benches/cold-start.sh (see benches/README.md). Each case starts the
proxy fresh, `--rounds` times, pinned to CPU 0, while this process (pinned to
CPU 1) tries, from the moment before the exec, to connect to the proxy's
outbound port and send `GET /` (`Host: bench`, `Connection: close`) until one
answers 200 from the backend. A refused connection is retried after 0.2 ms; an
answer other than 200 (e.g. a 503 before the directory is known) after 0.5 ms.
The time includes Python's fork and exec, the same for every case.

Cases:
- weft-static: a standalone sidecar with a one-service static directory.
- weft-cp-live: a sidecar with no static directory, a live control plane
  (`weft-control-plane --dev`) that knows service `bench` (registered by a
  server sidecar in front of the backend) and no snapshot cache: the first
  call is to a service this sidecar has never seen.
- weft-cp-cache: the same sidecar with the control plane stopped, starting
  from the snapshot cache a previous run wrote.
- haproxy, nginx: the same one-backend proxy started the same way.

Separately (other rounds), for the Weft cases: exec to `/ready` answering 200
on the admin port. RSS is read right after the first response.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import harness as h

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def on_cpu0():
    os.sched_setaffinity(0, {0})


def http_status(port, request, timeout=2.0):
    """Sends one request; the status code, or None if the connection was refused."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except (ConnectionRefusedError, socket.timeout):
        return None
    try:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return 0  # closed before a status line: not serving yet
            data += chunk
        parts = data.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    except OSError:
        return 0
    finally:
        s.close()


def time_until(p, port, request, limit=15.0):
    """Seconds from `t0` (set by the caller right before the exec) until a 200."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        status = http_status(port, request)
        if status == 200:
            return time.perf_counter()
        if p.poll() is not None:
            raise RuntimeError(f"the proxy exited with {p.returncode} before answering")
        time.sleep(0.0002 if status is None else 0.0005)
    raise RuntimeError(f"no 200 from 127.0.0.1:{port} within {limit}s")


class Case:
    """How to start one proxy: the command, the port to call, the admin port."""

    def __init__(self, name, title, cmd, port, admin=None, env=None, before=None):
        self.name = name
        self.title = title
        self.cmd = cmd
        self.port = port
        self.admin = admin
        self.env = env
        self.before = before  # called before each start (e.g. restore a cache file)


def start_once(case, what, errlog):
    if case.before:
        case.before()
    if what == "ready":
        port, request = case.admin, b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    else:
        port, request = case.port, REQUEST
    t0 = time.perf_counter()
    p = subprocess.Popen(case.cmd, preexec_fn=on_cpu0, env=case.env, stdout=errlog, stderr=errlog)
    try:
        t1 = time_until(p, port, request)
        rss = h.status_kb(p.pid, "VmRSS")
    finally:
        h.Procs().stop(p, timeout=10)
    return t1 - t0, rss


def weft_cases(bindir, work, backend, cp_port, cp_proc_ref):
    env = dict(os.environ, WEFT_LOG="warn")
    cases = []

    def sidecar(tag, body):
        out, admin = h.free_port(), h.free_port()
        cfg = os.path.join(work, f"{tag}.toml")
        with open(cfg, "w") as f:
            f.write(f'[listen]\noutbound = "127.0.0.1:{out}"\ninbound = "127.0.0.1:{h.free_port()}"\n'
                    f'admin = "127.0.0.1:{admin}"\n\n' + body)
        return [f"{bindir}/weft-proxy", "run", "--config", cfg], out, admin

    cmd, out, admin = sidecar("static", f'[[directory.services]]\nname = "bench"\n'
                                        f'endpoints = [ {{ address = "{backend}" }} ]\n')
    cases.append(Case("weft-static", "Weft, static directory (one service)", cmd, out, admin, env))

    cache = os.path.join(work, "snapshot.json")
    saved = os.path.join(work, "snapshot.saved.json")
    cp = f'[control_plane]\naddresses = ["http://127.0.0.1:{cp_port}"]\ncache = "{cache}"\n'
    cmd, out, admin = sidecar("cp", cp)

    def no_cache():
        if os.path.exists(cache):
            shutil.copy(cache, saved)  # the last live run's cache, for the cache case
            os.remove(cache)

    cases.append(Case("weft-cp-live", "Weft, live control plane, no cache", cmd, out, admin, env, no_cache))

    def from_cache():
        # The control plane is down from here on; the cache is the one a live run wrote.
        proc = cp_proc_ref.get("proc")
        if proc is not None and proc.poll() is None:
            h.Procs().stop(proc)
        if not os.path.exists(saved):
            raise RuntimeError("no snapshot cache was written by the live runs")
        shutil.copy(saved, cache)

    cases.append(Case("weft-cp-cache", "Weft, control plane down, snapshot cache", cmd, out, admin, env,
                      from_cache))
    return cases


def haproxy_case(work, backend):
    cmd, port = h.haproxy_command(work, [backend], name="haproxy-cold")
    return Case("haproxy", "HAProxy (nbthread 1)", cmd, port)


def nginx_case(work, backend):
    cmd, port = h.nginx_command(work, [backend], name="nginx-cold")
    return Case("nginx", "nginx (1 worker)", cmd, port)


def start_control_plane(procs, bindir, work):
    port, admin = h.free_port(), h.free_port()
    bound = os.path.join(work, "cp.bound.json")
    log = open(os.path.join(work, "cp.log"), "w")
    p = procs.start([f"{bindir}/weft-control-plane", "--dev", "--listen", f"127.0.0.1:{port}",
                     "--admin", f"127.0.0.1:{admin}", "--bound-file", bound],
                    cpu=h.LOAD_CPU, stdout=log, stderr=log, env=dict(os.environ, WEFT_LOG="warn"))
    h.wait_for(lambda: os.path.exists(bound), "the control plane")
    return p, port


def register_server(procs, bindir, work, backend, cp_port):
    """A server sidecar for `bench` in front of the backend, registered with the control plane."""
    body = (f'[service]\nname = "bench"\napp = "{backend}"\n\n' + h.LISTEN_LOCAL
            + f'\n[control_plane]\naddresses = ["http://127.0.0.1:{cp_port}"]\n')
    cfg = os.path.join(work, "server.toml")
    with open(cfg, "w") as f:
        f.write(body)
    bound = os.path.join(work, "server.bound.json")
    log = open(os.path.join(work, "server.log"), "w")
    p = procs.start([f"{bindir}/weft-proxy", "run", "--config", cfg, "--bound-file", bound],
                    cpu=h.LOAD_CPU, stdout=log, stderr=log, env=dict(os.environ, WEFT_LOG="warn"))

    def ready():
        try:
            with open(bound) as f:
                admin = json.load(f)["admin"]
        except (OSError, ValueError, KeyError):
            return None
        port = int(admin.rsplit(":", 1)[1])
        return http_status(port, b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n") == 200

    h.wait_for(ready, "the server sidecar", timeout=20)
    return p


def stats(values):
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "p90": values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))], "n": len(values)}


def run(args):
    os.sched_setaffinity(0, {1})
    bindir = args.bin
    work = os.path.realpath(tempfile.mkdtemp(prefix="weft-cold-"))
    procs = h.Procs()
    results = {}
    try:
        backend = h.start_backends(procs, bindir, n=1)[0]
        cp_proc, cp_port = start_control_plane(procs, bindir, work)
        register_server(procs, bindir, work, backend, cp_port)
        ref = {"proc": cp_proc}
        cases = weft_cases(bindir, work, backend, cp_port, ref)
        cases += [haproxy_case(work, backend), nginx_case(work, backend)]
        only = set(args.cases.split(",")) if args.cases else None
        # The cache case must come after the live one (it stops the control plane).
        for case in cases:
            if only and case.name not in only and not (case.name == "weft-cp-live" and "weft-cp-cache" in only):
                continue
            errlog = open(os.path.join(work, f"{case.name}.log"), "w")
            first, rss, ready = [], [], []
            for i in range(args.rounds):
                t, kb = start_once(case, "first", errlog)
                first.append(t * 1000)
                rss.append(kb)
                if case.admin:
                    t, _ = start_once(case, "ready", errlog)
                    ready.append(t * 1000)
            results[case.name] = {
                "title": case.title,
                "first_response_ms": stats(first),
                "ready_ms": stats(ready) if ready else None,
                "rss_kb_at_first_response": stats(rss),
            }
            r = results[case.name]
            h.log(f"{case.name:14} first response {r['first_response_ms']['median']:7.1f} ms "
                  f"(min {r['first_response_ms']['min']:.1f}, p90 {r['first_response_ms']['p90']:.1f})"
                  + (f"  ready {r['ready_ms']['median']:.1f} ms" if ready else "")
                  + f"  RSS {r['rss_kb_at_first_response']['median'] / 1024:.1f} MB")
    finally:
        procs.stop_all()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": h.machine(), "versions": h.versions(),
              "rounds": args.rounds, "cases": results}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cold-start.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "cold-start.md"), "w") as f:
        f.write(md)
    print(md)
    shutil.rmtree(work, ignore_errors=True)


def markdown(rep):
    m = rep["machine"]
    lines = [f"Cold-start bench, {rep['date']}: {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs; "
             f"the proxy on CPU 0, the prober on CPU 1; {rep['rounds']} starts per case. "
             "Milliseconds from before the exec; median (min-max, p90).", "",
             "| case | exec to first proxied response | exec to /ready | RSS at first response MB |",
             "|---|---|---|---|"]
    for c in rep["cases"].values():
        f = c["first_response_ms"]
        r = c["ready_ms"]
        ready = "-" if not r else f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}, {r['p90']:.1f})"
        lines.append(f"| {c['title']} | {f['median']:.1f} ({f['min']:.1f}-{f['max']:.1f}, {f['p90']:.1f}) | "
                     f"{ready} | {c['rss_kb_at_first_response']['median'] / 1024:.1f} |")
    return "\n".join(lines) + "\n"
