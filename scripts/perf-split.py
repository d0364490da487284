#!/usr/bin/env python3
"""Split a `perf script -F comm,pid,ip,sym` dump into where each process's CPU went.

Reads the dump on stdin; prints, per shop process, the share of its samples in each
category (the first category whose pattern matches the thread name or a frame of the
sample's call stack). Used by scripts/profile.sh; see BENCHMARKS.md.
"""
import collections
import re
import sys

# (process, [(category, pattern on "thread | frame ; frame ; ...")]); first match wins.
CATEGORIES = {
    "command-server": [
        ("flusher thread: sled flush + fdatasync", r"^shop-flusher"),
        ("sled I/O threads: write + sync_file_range of log buffers", r"^sled-io"),
        ("writer thread: sled apply_batch", r"^shop-writer.*apply_batch"),
        ("writer thread: decide/evolve (domain)", r"^shop-writer.*(domain::|decide|evolve)"),
        ("writer thread: encoding, batching, state cache", r"^shop-writer"),
        ("relay: read log + publish", r"relay::"),
        ("NATS client", r"async_nats"),
        ("gRPC: tonic / hyper / h2 / prost", r"(tonic|hyper|h2::|prost)"),
        ("tokio scheduler, kernel, other", r"."),
    ],
    "query-server": [
        ("sled I/O threads", r"^sled-io"),
        ("consumer: sled apply_batch (views, indexes, history, checkpoint)", r"sled::tree::Tree::apply_batch"),
        ("consumer: sled reads of current views", r"sled::tree::Tree::(get|range|scan|iter)|sled::Iter"),
        ("consumer: projections, encoding, batch assembly", r"(consumer::|projections::|store::)"),
        ("NATS client (ordered consumer)", r"async_nats"),
        ("gRPC: tonic / hyper / h2 / prost", r"(tonic|hyper|h2::|prost)"),
        ("tokio scheduler, kernel, other", r"."),
    ],
}

HEADER = re.compile(r"^\s*(.*?)\s+(\d+)\s*$")
FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*)$")


def main():
    samples = []  # (pid, thread, frames)
    current = None
    for line in sys.stdin:
        if not line.strip():
            if current:
                samples.append(current)
            current = None
            continue
        frame = FRAME.match(line)
        if frame and current is not None:
            current[2].append(frame.group(1))
            continue
        header = HEADER.match(line)
        if header:
            current = (header.group(2), header.group(1), [])
    if current:
        samples.append(current)

    # A process is named by its main thread (the one whose name is the binary's).
    names = {}
    per_pid = collections.Counter()
    for pid, thread, _ in samples:
        per_pid[pid] += 1
        if thread in CATEGORIES or thread == "nats-server" or thread == "bench":
            names.setdefault(pid, thread)
    total = len(samples)
    print(f"{total} samples on all CPUs\n")
    print("| process | share of all CPU samples |")
    print("|---|---|")
    for pid, n in per_pid.most_common():
        if n * 100 >= total:
            name = "idle" if pid == "0" else names.get(pid, "pid " + pid)
            print(f"| {name} | {100 * n / total:.1f}% |")

    for pid, name in names.items():
        if name not in CATEGORIES:
            continue
        rules = [(c, re.compile(p)) for c, p in CATEGORIES[name]]
        counts = collections.Counter()
        mine = [s for s in samples if s[0] == pid]
        for _, thread, frames in mine:
            text = thread + " | " + " ; ".join(frames)
            for category, rule in rules:
                if rule.search(text):
                    counts[category] += 1
                    break
        print(f"\n{name} ({len(mine)} samples)\n")
        print("| where | share of the process |")
        print("|---|---|")
        for category, _ in CATEGORIES[name]:
            print(f"| {category} | {100 * counts[category] / max(len(mine), 1):.1f}% |")


if __name__ == "__main__":
    main()
