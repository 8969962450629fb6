"""Cost of a nightly refresh with nothing to do: listing + fingerprints + plan over N shards.

Tiny shard files (the listing never opens them) in a local folder and in a
moto S3 bucket (moto's server in its own process on loopback). For each
input form (folder / ``s3://`` prefix, glob, brace pattern) it times
:func:`labelmill.io.shards.list_shard_fingerprints`, then
:func:`labelmill.store.refresh_plan.plan_refresh` against a current version
that already holds every shard with today's inputs (so the plan must say
"nothing to do"), and counts the S3 requests by operation.

Opening the current version belongs to the same no-op cost: the output
(a local folder, or a moto S3 prefix next to the shards) holds a real
version record naming every shard with its fingerprint and today's label
inputs, written once by :func:`make_output` through the store's commit;
:func:`open_current_version` reads the records back
(``OutputStore.versions``) and turns them into the planner's view, as
``labelmill refresh`` does. No table is read.

Examples::

    python benchmarks/bench_refresh.py                 # 10,000 shards, local and moto S3
    python benchmarks/bench_refresh.py --shards 2000 --no-s3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from labelmill.io.shards import Fingerprint, list_shard_fingerprints
from labelmill.store.commit import OutputStore
from labelmill.store.refresh_plan import CommittedShard, LabelInputs, committed_from_records, inputs_key, plan_refresh

TODAY = LabelInputs(teachers={"maskclip": "0123456789abcdef"}, shared="fedcba9876543210",
                    filter={"min_score": 0.5, "per_class_min_score": {}, "min_area": 0.0,
                            "max_labels_per_image": None})


def make_output(output: str, storage_options: dict[str, Any] | None, listing: dict[str, Fingerprint]) -> None:
    """An output whose current version holds every listed shard, labelled with ``TODAY``'s inputs."""
    key = inputs_key(TODAY)
    store = OutputStore(output, storage_options)
    store.commit([], [{"shard": url, "fingerprint": fp.to_dict(), "inputs": key, "dropped_small_area": 0,
                       "dropped_over_max": 0} for url, fp in listing.items()],
                 info={"label_inputs": {key: TODAY.to_dict()}}, kind="refresh")


def open_current_version(output: str, storage_options: dict[str, Any] | None) -> dict[str, CommittedShard]:
    """The committed shards of the output's current version, from its version records (as a refresh reads them)."""
    store = OutputStore(output, storage_options)
    records = store.versions()
    return committed_from_records(store.shard_items(records), store.label_inputs(records))


def one_pass(spec: str, storage_options: dict[str, Any] | None, n: int, output: str) -> dict[str, float]:
    t0 = time.perf_counter()
    listing = list_shard_fingerprints(spec, storage_options)
    t1 = time.perf_counter()
    committed = open_current_version(output, storage_options)
    t2 = time.perf_counter()
    plan = plan_refresh(listing, committed, TODAY)
    t3 = time.perf_counter()
    assert len(listing) == n, (spec, len(listing))
    assert plan.nothing_to_do, plan.summary()
    return {"list": t1 - t0, "open": t2 - t1, "plan": t3 - t2, "total": t3 - t0}


def report(where: str, form: str, timings: list[dict[str, float]], requests: str = "") -> None:
    best = min(timings, key=lambda t: t["total"])
    print(f"| {where} | {form} | {best['list']:.2f} | {best['open']:.3f} | {best['plan']:.3f} | "
          f"**{best['total']:.2f}** | {requests} |", flush=True)


def local(n: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-refresh-") as root:
        folder = os.path.join(root, "shards")
        os.makedirs(folder)
        for i in range(n):
            with open(os.path.join(folder, f"part-{i:05d}.tar"), "wb") as fh:
                fh.write(b"x" * (100 + i % 50))
        output = os.path.join(root, "out")
        make_output(output, None, list_shard_fingerprints(folder))
        for form, spec in [("folder", folder), ("glob", f"{folder}/*.tar"),
                           ("brace", f"{folder}/part-{{00000..{n - 1:05d}}}.tar")]:
            report("local", form, [one_pass(spec, None, n, output) for _ in range(repeats)])


SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
server.start()
host, port = server.get_host_and_port()
print(f"ENDPOINT http://{host}:{port}", flush=True)
sys.stdin.read()
server.stop()
"""


def s3(n: int, repeats: int) -> None:
    import boto3
    import s3fs

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    endpoint = next(line.split()[1] for line in proc.stdout if line.startswith("ENDPOINT "))
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="data")
        opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**opts)
        t0 = time.perf_counter()
        for start in range(0, n, 500):
            fs.pipe({f"data/shards/part-{i:05d}.tar": b"x" * (100 + i % 50) for i in range(start, min(n, start + 500))})
        print(f"(uploaded {n} objects to moto in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)

        output = "s3://data/out"
        make_output(output, opts, list_shard_fingerprints("s3://data/shards", opts))
        calls: Counter[str] = Counter()
        original = s3fs.S3FileSystem._call_s3

        async def counted(self, method, *args, **kwargs):
            calls[method] += 1
            return await original(self, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted
        for form, spec in [("prefix", "s3://data/shards"), ("glob", "s3://data/shards/*.tar"),
                           ("brace", f"s3://data/shards/part-{{00000..{n - 1:05d}}}.tar")]:
            timings = []
            for _ in range(repeats):
                calls.clear()
                timings.append(one_pass(spec, opts, n, output))
            requests = ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) + " (last pass)"
            report("moto S3", form, timings, requests)
        s3fs.S3FileSystem._call_s3 = original
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="passes per form; the best is reported")
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()
    print(f"{args.shards} shards, best of {args.repeats}; seconds")
    print("| where | input form | list + fingerprints | open version | plan | total | requests |")
    print("|---|---|---|---|---|---|---|")
    local(args.shards, args.repeats)
    if not args.no_s3:
        s3(args.shards, args.repeats)


if __name__ == "__main__":
    main()
