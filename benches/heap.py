"""Summarises a massif profile (benches/heap.sh): the peak snapshot's heap by
allocation site, total and per connection.

Usage: python3 benches/heap.py MASSIF_OUT CONNECTIONS [LOAD_JSON]"""

import json
import re
import sys

# The first frame (innermost first) naming one of these is the allocation site.
SITES = ("weft_", "hyper::", "hyper_util::", "h2::", "rustls::", "tokio::", "tower::")
NODE = re.compile(r"^( *)n\d+: (\d+) (.*)$")


def snapshots(path):
    """(heap bytes, extra-heap bytes, tree lines) of each detailed snapshot."""
    snap, out = None, []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("snapshot="):
                snap = {"heap": 0, "extra": 0, "tree": []}
                out.append(snap)
            elif line.startswith("mem_heap_B="):
                snap["heap"] = int(line.split("=")[1])
            elif line.startswith("mem_heap_extra_B="):
                snap["extra"] = int(line.split("=")[1])
            elif snap is not None and line.startswith((" ", "n")) and not line.startswith("heap_tree"):
                snap["tree"].append(line)
    return [s for s in out if s["tree"]]


def sites(tree):
    """The top-level allocation entries of a massif tree: [bytes, frames below
    it in file order, innermost first along its first call chain]."""
    entries = []
    for line in tree:
        m = NODE.match(line)
        if not m:
            continue
        depth, size, frame = len(m.group(1)), int(m.group(2)), m.group(3)
        if depth == 1:
            entries.append([size, []])
        if depth >= 1 and entries:
            entries[-1][1].append(frame)
    return entries


def strip_generics(text):
    """`f<A<B>>::g<C>` -> `f::g`; `<X<T> as Y>::poll` keeps its `<X as Y>`."""
    while True:
        stripped = re.sub(r"(?<=[\w])<[^<>]*>", "", text)
        if stripped == text:
            return text
        text = stripped


def describe(frames):
    """The first frame, innermost first, that names one of SITES (in its
    generic arguments too: `Vec::with_capacity<hyper::...>`), without its
    generic arguments; with its caller when it is a bare function name."""
    texts = [frame.split(": ", 1)[-1] for frame in frames]
    for i, text in enumerate(texts):
        if any(s in text for s in SITES):
            name = strip_generics(text)
            if "::" not in name.split(" (")[0]:
                caller = next((strip_generics(t) for t in texts[i + 1:] if "::" in strip_generics(t).split(" (")[0]), "")
                name = f"{name} in {caller}" if caller else name
            return f"{side(texts)}{name[:160]}"
    return strip_generics(texts[0])[:160] if texts else "?"


def side(texts):
    """Which connections an allocation belongs to: the innermost frame naming
    hyper's client or server side (the upstream request runs inside the
    downstream connection's task, so outer frames name both)."""
    for text in texts:
        if any(k in text for k in ("role::Client", "dispatch::Client", "client::conn", "client::dispatch",
                                   "pool::")):
            return "upstream: "
        if any(k in text for k in ("role::Server", "dispatch::Server", "server::conn", "server::serve")):
            return "downstream: "
    return ""


def main():
    path, conns = sys.argv[1], int(sys.argv[2])
    snaps = snapshots(path)
    if not snaps:
        sys.exit("no detailed snapshot in " + path)
    peak = max(snaps, key=lambda s: s["heap"])
    groups = {}
    for size, frames in sites(peak["tree"]):
        key = describe(frames[1:]) if len(frames) > 1 else frames[0]
        groups[key] = groups.get(key, 0) + size
    total = peak["heap"] + peak["extra"]
    if len(sys.argv) > 3:
        load = json.load(open(sys.argv[3]))
        print(f"load: {conns} connections, {load.get('rps', 0):.0f} req/s under valgrind, errors {load.get('errors')}")
    print(f"heap at the peak: {peak['heap'] / 1e6:.2f} MB (+{peak['extra'] / 1e6:.2f} MB allocator overhead), "
          f"{total / conns / 1024:.1f} KiB per connection")
    print()
    print("| allocation site | MB | KiB per connection |")
    print("|---|---|---|")
    for key, size in sorted(groups.items(), key=lambda kv: -kv[1]):
        if size * 200 < peak["heap"]:
            continue
        print(f"| `{key}` | {size / 1e6:.2f} | {size / conns / 1024:.1f} |")


if __name__ == "__main__":
    main()
