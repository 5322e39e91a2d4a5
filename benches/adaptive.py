#!/usr/bin/env python3
"""The adaptive-concurrency bench (benches/adaptive.sh): an instance whose
capacity halves mid-run, behind a caller sidecar with a static per-endpoint cap
set for the healthy capacity, then at twice that, then with an adaptive limit.

Two weft-bench-backend instances of bounded capacity (`--slots` requests
served at once, `--service-time` ms each, more queue inside the backend, out
of the caller's sight), one caller sidecar in front of them, and weft-load in
open loop at `--rate` req/s (above half the healthy capacity). Each run: a
phase "before" of `--before` seconds, then SIGUSR1 takes half of one
instance's slots away, then a phase "after" of `--after` seconds, measured
from the switch (the transition included). The same for each policy, one run
after the other, each with fresh processes. Writes adaptive.json and
adaptive.md in --out.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import LOAD_CPU, Procs, Target, caller_toml, load_avg, log, machine, run_load, start_weft  # noqa: E402


def policies(args):
    lb = f'load_balancer = "{args.load_balancer}"\nretry = {{ attempts = 0 }}\n'
    return [
        ("static", f"endpoint_max_concurrency = {args.slots}",
         f"outbound.endpoint_max_concurrency = {args.slots} (the healthy capacity)"),
        ("static-headroom", f"endpoint_max_concurrency = {2 * args.slots}",
         f"outbound.endpoint_max_concurrency = {2 * args.slots} (twice the healthy capacity, for bursts)"),
        ("adaptive",
         f"adaptive_concurrency = {{ min_limit = 1, max_limit = {4 * args.slots}, initial_limit = {args.slots} }}",
         f"outbound.adaptive_concurrency, min 1, max {4 * args.slots}, initial {args.slots}, defaults otherwise"),
    ], lb


def start_backend(procs, bindir, args, degrade):
    cmd = [f"{bindir}/weft-bench-backend", "--slots", str(args.slots), "--service-time", str(args.service_time)]
    if degrade:
        cmd += ["--degrade-slots", str(args.slots // 2)]
    p = procs.start(cmd, cpu=LOAD_CPU, stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def endpoints(admin):
    with urllib.request.urlopen(f"http://{admin}/endpoints", timeout=5) as r:
        return json.load(r)


def one_run(bindir, args, name, key, lb):
    work = tempfile.mkdtemp(prefix=f"weft-adaptive-{name}-")
    procs = Procs()
    try:
        pa, addr_a = start_backend(procs, bindir, args, False)
        pb, addr_b = start_backend(procs, bindir, args, True)
        with open(os.path.join(work, "bench.toml"), "w") as f:
            f.write(f'service = "bench"\n\n[outbound]\n{lb}{key}\n')
        p, bound, _ = start_weft(procs, bindir, work, "caller", caller_toml([addr_a, addr_b]))
        target = Target("weft", name, [bound["outbound"]])
        target.roots.append(("sidecar", p))
        load = dict(connections=args.connections, rate=args.rate)
        log(f"{name}: before ({args.before:.0f} s at {args.rate} req/s)")
        before = run_load(bindir, target, f"{name}-before", seconds=args.before, warmup=args.warmup, **load)
        os.kill(pb.pid, signal.SIGUSR1)
        log(f"{name}: one instance's capacity halved; after ({args.after:.0f} s)")
        series = []
        after = run_load(bindir, target, f"{name}-after", seconds=args.after, warmup=0, interval=1,
                         stream=series.append, **load)
        state = endpoints(bound["admin"])
        eps = {e["address"]: e for s in state["services"] if s["name"] == "bench" for e in s["endpoints"]}
        limits = {"healthy": eps.get(addr_a, {}).get("adaptive_limit"),
                  "halved": eps.get(addr_b, {}).get("adaptive_limit")}
        requests = {"healthy": eps.get(addr_a, {}).get("requests"), "halved": eps.get(addr_b, {}).get("requests")}
        return {"policy": name, "key": key, "before": before, "after": after,
                "after_series": [s for s in series if s.get("kind") == "interval"],
                "limits_at_end": limits, "requests_per_endpoint": requests}
    finally:
        procs.stop_all()


def row(phase, r):
    total = r["requests"] + r["errors"]
    err = 100.0 * r["errors"] / total if total else 0.0
    return (f"| {phase} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p999_ms']:.1f} "
            f"| {r['max_ms']:.1f} | {err:.2f}% |")


def markdown(rep):
    a = rep["args"]
    out = [
        "# Adaptive concurrency: an instance whose capacity halves mid-run",
        "",
        f"Run {rep['date']} on {rep['machine'].get('Model name', '?')} ({rep['machine'].get('CPU(s)', '?')} CPUs); "
        f"load average {rep['load_before']:.2f} before, {rep['load_after']:.2f} after (other work on the machine "
        "skews the figures). Reproduce: `benches/adaptive.sh`.",
        "",
        f"Two backend instances, each serving at most {a['slots']} requests at once for {a['service_time']} ms "
        f"each ({1000 * a['slots'] / a['service_time']:.0f} req/s per instance; more wait inside the backend), "
        f"behind one caller sidecar ({a['load_balancer']}, no retries). Open-loop load of {a['rate']} req/s "
        f"over {a['connections']} connections ({100 * a['rate'] * a['service_time'] / (2000 * a['slots']):.0f}% "
        f"of the healthy capacity). After {a['before']:.0f} s (\"before\", after {a['warmup']:.0f} s of warm-up), "
        f"one instance loses half of its slots; \"after\" is the {a['after']:.0f} s from that moment, transition "
        "included. Latency in ms, from each request's scheduled send time; errors are refusals "
        "(`503 concurrency-cap`) and failures, over all requests sent.",
        "",
    ]
    for run in rep["runs"]:
        out += [
            f"## {run['policy']}: {run['key']}",
            "",
            "| phase | req/s ok | p50 | p99 | p99.9 | max | errors |",
            "|---|---|---|---|---|---|---|",
            row("before", run["before"]),
            row("after", run["after"]),
            "",
        ]
        if run["policy"] == "adaptive":
            lim = run["limits_at_end"]
            out += [f"Limits at the end: healthy instance {lim['healthy']}, halved instance {lim['halved']}.", ""]
        req = run["requests_per_endpoint"]
        out += [f"Requests per instance over the run: healthy {req['healthy']}, halved {req['halved']}.", ""]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--service-time", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--before", type=float, default=15)
    ap.add_argument("--after", type=float, default=30)
    ap.add_argument("--load-balancer", default="round-robin")
    ap.add_argument("--policies", default="static,static-headroom,adaptive")
    args = ap.parse_args()
    chosen, lb = policies(args)
    wanted = args.policies.split(",")
    load_before = load_avg()
    runs = [one_run(args.bin, args, name, key, lb) for name, key, _ in chosen if name in wanted]
    rep = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_avg(),
        "args": vars(args),
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "adaptive.json"), "w") as f:
        json.dump(rep, f, indent=1)
    with open(os.path.join(args.out, "adaptive.md"), "w") as f:
        f.write(markdown(rep))
    log(f"wrote {args.out}/adaptive.json and adaptive.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
