"""SVG plots of the data-plane bench, written next to its report.

`python3 benches/plot.py benches/results/data-plane.json` redraws them from a
saved report; benches/harness.py calls `data_plane` after each run. Plain SVG
with no dependencies:

- `data-plane-latency-<rate>.svg`: for each open-loop rate, latency (ms, log
  scale) against percentile, p50 to p99.99, on a "nines" axis (50, 90, 99,
  99.9, 99.99 equally spaced), one line per path (medians of the rounds).
- `data-plane-rps-per-core.svg`: requests per proxy core, one group of bars
  per closed-loop connection count, one bar per proxy path.
"""

import html
import json
import math
import os
import sys

# One colour per path, the same in every plot.
COLOURS = {"direct": "#7f7f7f", "weft": "#1f77b4", "weft-baseline": "#9ecae1", "mesh": "#2ca02c", "mesh-mtls": "#98df8a",
           "nginx": "#d62728", "haproxy": "#ff7f0e"}
WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 190, 40, 50


def colour(name):
    return COLOURS.get(name, "#8c564b")


def nines(p):
    """Position of percentile p on the x axis: 50 -> log10(2), 90 -> 1, 99 -> 2, ..."""
    return math.log10(100.0 / (100.0 - p))


def text(x, y, s, anchor="middle", size=12, extra=""):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-family="sans-serif"{extra}>{html.escape(str(s))}</text>')


def frame(title):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">',
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
            text(WIDTH / 2, 22, title, size=14)]


def legend(names, titles):
    out = []
    for i, name in enumerate(names):
        y = TOP + 10 + i * 20
        x = WIDTH - RIGHT + 15
        out.append(f'<rect x="{x}" y="{y - 9}" width="14" height="10" fill="{colour(name)}"/>')
        out.append(text(x + 20, y, titles.get(name, name), anchor="start", size=11))
    return out


def latency_svg(report, rate):
    targets = {n: t for n, t in report["targets"].items()
               if (t["rates"].get(str(rate)) or {}).get("percentiles_ms")}
    if not targets:
        return None
    curves = {n: {float(p): v for p, v in t["rates"][str(rate)]["percentiles_ms"].items() if v > 0}
              for n, t in targets.items()}
    ps = sorted({p for c in curves.values() for p in c})
    values = [v for c in curves.values() for v in c.values()]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    x0, x1 = nines(ps[0]), nines(ps[-1])
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(p):
        return LEFT + (nines(p) - x0) / (x1 - x0) * pw

    def sy(v):
        return TOP + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    out = frame(f"Latency by percentile at {rate:,} req/s (open loop, median of rounds)")
    decade = lo
    while decade <= hi * 1.0001:
        for m in (1, 2, 5):
            v = decade * m
            if v > hi * 1.0001:
                break
            y = sy(v)
            out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" '
                       f'stroke="{"#ccc" if m == 1 else "#eee"}"/>')
            out.append(text(LEFT - 6, y + 4, f"{v:g}", anchor="end", size=11 if m == 1 else 9))
        decade *= 10
    for p in ps:
        x = sx(p)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#eee"/>')
        out.append(text(x, TOP + ph + 16, f"p{p:g}", size=10))
    out.append(text(LEFT + pw / 2, HEIGHT - 10, "percentile", size=12))
    out.append(text(16, TOP + ph / 2, "ms (log)", size=12, extra=f' transform="rotate(-90 16 {TOP + ph / 2})"'))
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for name, c in curves.items():
        pts = " ".join(f"{sx(p):.1f},{sy(v):.1f}" for p, v in sorted(c.items()))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour(name)}" stroke-width="2"/>')
        for p, v in sorted(c.items()):
            out.append(f'<circle cx="{sx(p):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{colour(name)}">'
                       f'<title>{html.escape(name)} p{p:g}: {v:.3f} ms</title></circle>')
    out += legend(list(curves), {n: short_title(t["title"]) for n, t in targets.items()})
    out.append("</svg>")
    return "\n".join(out) + "\n"


def short_title(title):
    return title.split(" (")[0]


def rps_svg(report):
    conns = [str(c) for c in report["settings"]["connections_closed_loop"]]
    names = [n for n, t in report["targets"].items()
             if any((t["closed"].get(c) or {}).get("rps_per_core") for c in conns)]
    if not names:
        return None
    value = {(n, c): ((report["targets"][n]["closed"].get(c) or {}).get("rps_per_core") or {}).get("median")
             for n in names for c in conns}
    top = max(v for v in value.values() if v)
    # A round tick step (1, 2 or 5 times a power of ten) giving 4 to 10 ticks.
    unit = 10 ** math.floor(math.log10(top))
    step = next(m * unit / 10 for m in (1, 2, 5, 10, 20, 50) if top / (m * unit / 10) <= 10)
    hi = math.ceil(top / step) * step
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = frame("Requests per proxy core (closed loop, median of rounds)")
    tick = 0
    while tick <= hi:
        y = TOP + ph - tick / hi * ph
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(text(LEFT - 6, y + 4, f"{tick:,.0f}", anchor="end", size=11))
        tick += step
    group = pw / len(conns)
    bar = group * 0.8 / len(names)
    for gi, c in enumerate(conns):
        gx = LEFT + gi * group + group * 0.1
        for bi, n in enumerate(names):
            v = value[(n, c)]
            if not v:
                continue
            h = v / hi * ph
            x = gx + bi * bar
            out.append(f'<rect x="{x:.1f}" y="{TOP + ph - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                       f'fill="{colour(n)}"><title>{html.escape(n)}, {c} connections: {v:,.0f} req/s per core'
                       f'</title></rect>')
        out.append(text(LEFT + gi * group + group / 2, TOP + ph + 18, f"{c} connections", size=12))
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out += legend(names, {n: short_title(report["targets"][n]["title"]) for n in names})
    out.append("</svg>")
    return "\n".join(out) + "\n"


def data_plane(report, out_dir):
    """Writes the plots of a data-plane report; returns the paths written."""
    written = []
    for rate in report["settings"]["rates"]:
        svg = latency_svg(report, rate)
        if svg:
            path = os.path.join(out_dir, f"data-plane-latency-{rate}.svg")
            with open(path, "w") as f:
                f.write(svg)
            written.append(path)
    svg = rps_svg(report)
    if svg:
        path = os.path.join(out_dir, "data-plane-rps-per-core.svg")
        with open(path, "w") as f:
            f.write(svg)
        written.append(path)
    return written


if __name__ == "__main__":
    source = sys.argv[1] if len(sys.argv) > 1 else "benches/results/data-plane.json"
    with open(source) as f:
        rep = json.load(f)
    for p in data_plane(rep, os.path.dirname(source) or "."):
        print(p)
