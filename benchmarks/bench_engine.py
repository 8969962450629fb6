"""Engine ceiling, the simulated device, and the host CPU each teacher costs.

    python benchmarks/bench_engine.py                      # ceiling and teacher costs, defaults below
    python benchmarks/bench_engine.py --images 2048 --shards 16 --skip-teachers
    python benchmarks/bench_engine.py --simulate-device --images 512 --shards 8   # issue 18's CPU criteria

1. **Ceiling.**  The null teacher (no network, one fixed label per image)
   runs the whole engine -- read -> prepare -> infer -> finish -> filter ->
   write, Delta commits included -- and, in the same process on the same
   already-started local Ray, a decode-only job reads and decodes the same
   shards with the same plan (read tasks, CPUs) and drops the pixels.  ratio
   = engine img/s / decode-only img/s; the goal is >= 0.9 (the engine adds
   < 10 % to decoding).  Ray start-up is outside both timings; each job's
   wall time runs from building the dataset to the last row (the engine's
   includes its commits).
2. **Simulated device** (``--simulate-device``).  Each teacher's forward and
   device post-processing is replaced by a wait that releases the GIL, for
   a given milliseconds per forward batch, returning the raw device results
   the real teacher produced beforehand on the same photos
   (``benchmarks/simdevice.py``; recordings cached under ``.bench/sim``).
   Everything else is the real pipeline on local Ray: read, prepare (decode,
   GLIP's noun phrases and tokens), infer (pixels in, raw columns out),
   finish (RLE, label rows, regions), filter, write, commits.  Per teacher:
   a run with no device time measures the host capacity (img/s); a second
   run simulates a device at 80 % of it.  Reported: the pipeline's rate
   against the simulated device rate (goal >= 0.9), and the ``infer``
   process's CPU-ms per image (goal <= 0.5; whole-process CPU time, Ray's
   own threads in that process included).
3. **Host CPU per teacher** (``--teachers``).  In-process, one torch
   thread: per teacher, CPU-ms per image of its prepare, infer and finish
   parts, the infer part split into the networks' forward (hooks) and the
   rest; and the infer stage's own cost per image with the null teacher.
   On CPU the "device" post-processing runs on the CPU and is counted in
   infer; on a GPU it runs on the device (see gpu_suite.sh).

Models are random-init ("small" sizes below, see benchmarks/workload.py):
the figures measure the engine, not label quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402

from workload import ForwardClock, build_shards, photos, teacher_sections  # noqa: E402

NULL = {"type": "null", "short_side": 448, "max_long_side": 1333}


def run_config(shards: list[str], out: str, batch: int) -> dict:
    return {
        "input": {"shards": shards},
        "output": {"path": out, "commit_every_shards": 4},
        "teachers": [NULL],
        "ray": {"batch_size": batch, "device": "cpu"},
        "allow_random_init": True,
        "progress_interval_s": 3600,
    }


def decode_only(cfg) -> tuple[int, float]:
    """Rows and seconds of the same read + decode (the engine's operators and plan), the pixels dropped
    on the workers."""
    import ray

    from labelmill.engine import Engine, Pipeline
    from labelmill.engine.runtime import configure_ray_data, default_budget_mb
    from labelmill.io.shards import list_shards
    from labelmill.pipelines.label import build_pipeline

    full = build_pipeline(cfg)
    engine = Engine(cfg.ray, batch_size=cfg.ray.batch_size)
    plan = engine.place(full, ray.cluster_resources(), False)  # the label run's plan: same read tasks, CPUs
    rows = max((s.bytes_per_row() or 0) for s in full.stages) or 1 << 20
    configure_ray_data(plan, cfg.ray.object_store_budget_mb or default_budget_mb(plan, cfg.ray.batch_size, rows))
    pipe = Pipeline("decode-only", [full.source, full.find(name="prepare")])
    urls = list_shards(cfg.input.shards, cfg.input.storage_options)
    t0 = time.perf_counter()
    n = 0
    ds = engine.dataset(pipe, urls, plan)
    # drop the pixels on the workers, as the engine keeps them there: only a key column reaches the driver
    ds = ds.map_batches(lambda t: t.select([0]), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        n += b.num_rows
    return n, time.perf_counter() - t0


def engine(cfg) -> tuple[int, float]:
    from labelmill.pipelines.label import run

    t0 = time.perf_counter()
    summary = run(cfg, stream=open(os.devnull, "w"))
    return summary.counters.samples, time.perf_counter() - t0


def in_process(cfg, shards: list[str], work: Path) -> dict:
    """Both jobs in this one process, no Ray: the same stage objects, block by block."""
    from labelmill.engine import CommitLoop
    from labelmill.engine.runtime import plan_resources
    from labelmill.pipelines.label import build_pipeline
    from labelmill.stages.base import Resources
    from labelmill.store.commit import OutputStore

    plan = plan_resources(cfg.ray, float(os.cpu_count() or 1), 0.0)
    pipe = build_pipeline(cfg)
    read, decode, infer, finish, filt, write = (
        pipe.find(name=n) for n in ("read", "prepare", "infer", "finish", "filter", "write"))
    infer.place(Resources(cpus=plan.cpus_per_actor, gpus=0.0), plan.torch_threads)
    for stage in (decode, infer, finish, filt, write):
        stage.setup()
    finish.process_batch(infer.process_batch(decode.process_batch(next(read.read_blocks(shards[0])))))  # warm-up
    t0 = time.perf_counter()
    n_dec = 0
    for url in shards:
        for block in read.read_blocks(url):
            n_dec += decode.process_batch(block).num_rows
    t_dec = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = OutputStore(cfg.output.path, {}, cfg.output.compression)
    store.claim(cfg.model_dump(mode="json"), cfg.label_hash())
    loop = CommitLoop(store, cfg.output.commit_every_shards)
    read.reporter = loop.shard_read
    parts = dict.fromkeys(("read", "prepare", "infer", "finish", "filter", "write"), 0.0)

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        parts[name] += time.perf_counter() - t
        return out

    for url in shards:
        blocks = read.read_blocks(url)
        while (block := timed("read", next, blocks, None)) is not None:
            b = timed("prepare", decode.process_batch, block)
            b = timed("finish", finish.process_batch, timed("infer", infer.process_batch, b))
            timed("write", loop.add, timed("write", write.process_batch, timed("filter", filt.process_batch, b)))
    counters = timed("write", loop.finish)
    t_eng = time.perf_counter() - t0
    n_eng = counters.samples
    assert n_dec == n_eng, (n_dec, n_eng)
    return {"decode_only_img_s": n_dec / t_dec, "engine_img_s": n_eng / t_eng,
            "ratio": (n_eng / t_eng) / (n_dec / t_dec),
            **{f"engine_{k}_ms_per_img": 1000 * v / n_eng for k, v in parts.items()}}


def ceiling(args, work: Path, blobs: list[bytes]) -> dict:
    from labelmill.config import load_config

    shards = build_shards(work / "shards", blobs, args.images, args.shards)
    if args.in_process:
        rounds = []
        for r in range(args.rounds):
            cfg = load_config(run_config(shards, str(work / f"out-{r}"), args.batch))
            rounds.append(in_process(cfg, shards, work))
            print(f"round {r} (in-process): {json.dumps({k: round(v, 3) for k, v in rounds[-1].items()})}", flush=True)
        return {"mode": "in-process (no Ray)", "images": args.images, "shards": args.shards, "rounds": rounds,
                "ratio_mean": float(np.mean([r["ratio"] for r in rounds]))}
    import ray

    from labelmill.config import load_config

    for attempt in range(4):  # a loaded shared VM can miss Ray's fixed 30 s node start-up wait
        try:
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False)
            break
        except Exception as exc:
            print(f"ray.init failed ({exc}); retrying", flush=True)
            ray.shutdown()
            time.sleep(10)
    else:
        raise RuntimeError("could not start a local Ray")
    try:
        rounds = []
        for r in range(args.rounds):
            out = work / f"out-{r}"
            cfg = load_config(run_config(shards, str(out), args.batch))
            n_dec, t_dec = decode_only(cfg)
            n_eng, t_eng = engine(cfg)
            assert n_dec == n_eng == args.images, (n_dec, n_eng)
            rounds.append({"decode_only_img_s": n_dec / t_dec, "engine_img_s": n_eng / t_eng,
                           "ratio": (n_eng / t_eng) / (n_dec / t_dec)})
            shutil.rmtree(out, ignore_errors=True)
            print(f"round {r}: {json.dumps({k: round(v, 3) for k, v in rounds[-1].items()})}", flush=True)
    finally:
        ray.shutdown()
    return {
        "mode": "local Ray",
        "images": args.images,
        "shards": args.shards,
        "rounds": rounds,
        "ratio_mean": float(np.mean([r["ratio"] for r in rounds])),
    }


def decoded_batches(blobs, request, batch: int, n: int):
    import torch

    from labelmill.io.images import decode_image
    from labelmill.teachers.base import ImageBatch

    decoded = [decode_image(blobs[i % len(blobs)], request, 90_000_000) for i in range(n)]
    out = []
    for s in range(0, n, batch):
        part = decoded[s : s + batch]
        pixels = [np.ascontiguousarray(d.pixels) for d in part]
        out.append(ImageBatch(None, [p.shape[:2] for p in pixels], [d.orig_hw for d in part],
                              ["a person riding a horse near a car"] * len(part), [f"k{s + j}" for j in range(len(part))],
                              [{} for _ in part], host=pixels, images=[torch.from_numpy(p) for p in pixels]))
    return out


def teacher_costs(args, blobs: list[bytes]) -> dict:
    """Per teacher, CPU-ms per image of prepare, infer (forward and the rest) and finish, in this process."""
    import torch

    from labelmill.teachers.base import FinishInfo, build_teacher, upstream_views, validate_teacher_config

    torch.set_num_threads(1)
    device = torch.device("cpu")
    sections = teacher_sections("small")
    results = {}
    glip_raws: list = []
    for name in ("glip", "maskclip", "vild_dense", "vild_crop"):
        cfg = validate_teacher_config(sections[name])
        teacher = build_teacher(cfg, device, allow_random_init=True)
        batches = decoded_batches(blobs, cfg.image_request(), args.teacher_batch, args.teacher_images)
        clock = ForwardClock(teacher.torch_modules())
        cpu = dict.fromkeys(("prepare", "infer", "finish"), 0.0)
        n, outs = 0, []
        for b, batch in enumerate(batches):
            upstream = {"glip": upstream_views(glip_raws[b][0], glip_raws[b][1], batch.orig_hw)} \
                if name.startswith("vild") else {}
            if b == 1:  # batch 0 warms up
                clock.cpu, n = 0.0, 0
                cpu = dict.fromkeys(cpu, 0.0)
            t0 = time.thread_time()
            prepared = teacher.host.prepare(list(batch.captions), list(batch.metas))
            t1 = time.thread_time()
            with torch.inference_mode():
                raw = teacher.infer_async(batch, upstream, prepared).result()
            t2 = time.thread_time()
            outs = teacher.host.finish(raw, FinishInfo.of(batch, prepared))
            t3 = time.thread_time()
            cpu["prepare"] += t1 - t0
            cpu["infer"] += t2 - t1
            cpu["finish"] += t3 - t2
            n += len(batch)
            if name == "glip":
                glip_raws.append((teacher.host, raw))
        clock.remove()
        results[name] = {
            "stored_bytes_per_img": stored_bytes(name, outs),
            "images": n,
            "cpu_ms_per_img_prepare": 1000 * cpu["prepare"] / n,
            "cpu_ms_per_img_infer_forward": 1000 * clock.cpu / n,
            "cpu_ms_per_img_infer_outside_forward": 1000 * (cpu["infer"] - clock.cpu) / n,
            "cpu_ms_per_img_finish": 1000 * cpu["finish"] / n,
            "labels_per_img": float(np.mean([len(o.labels) + (len(o.regions.boxes) if o.regions else 0)
                                             for o in outs if o is not None])),
        }
        print(f"{name}: {json.dumps({k: round(v, 2) for k, v in results[name].items()})}", flush=True)
    results["infer_stage_null"] = stage_cost(args, blobs)
    print(f"infer stage (null teacher): {results['infer_stage_null']}", flush=True)
    return results


def stored_bytes(teacher: str, outs) -> float:
    """Bytes per image of these outputs as zstd Parquet (label rows, or region rows)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelmill.schemas.tables import LABEL_STRUCT, label_to_struct, regions_array

    outs = [o for o in outs if o is not None]
    labels = [label_to_struct(lab, teacher) for o in outs for lab in o.labels]
    if labels:
        table = pa.table({"label": pa.array(labels, LABEL_STRUCT)}).flatten()
    else:
        table = pa.table({"regions": regions_array([[(teacher, o.regions)] for o in outs if o.regions is not None])})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.tell() / max(len(outs), 1)


def stage_cost(args, blobs: list[bytes]) -> dict:
    """CPU-ms per image of InferImages.process_batch itself (null teacher), decode in the actor or not."""
    import pyarrow as pa

    from labelmill.schemas.records import ImageRequest
    from labelmill.schemas.tables import Col
    from labelmill.stages.infer import InferImages
    from labelmill.stages.prepare import PrepareInputs
    from labelmill.teachers.base import validate_teacher_config

    n = args.teacher_images
    request = ImageRequest(short_side=448, max_long_side=1333)
    raw = pa.table({
        Col.KEY: [f"k{i}" for i in range(n)], Col.SHARD: ["s"] * n,
        Col.IMAGE_BYTES: pa.array([blobs[i % len(blobs)] for i in range(n)], pa.binary()),
        Col.IMAGE_EXT: ["jpg"] * n, Col.CAPTION_BYTES: pa.array([b"a photo"] * n, pa.binary()),
        Col.META_JSON: ["{}"] * n, Col.ERROR: pa.array([None] * n, pa.string()),
        Col.WARNINGS: pa.array([[] for _ in range(n)], pa.list_(pa.string())),
    })
    teachers = [validate_teacher_config(NULL)]
    out = {}
    for mode in ("tasks", "actor"):
        batch = PrepareInputs(request, 90_000_000, teachers=teachers, decode=mode == "tasks").process_batch(raw)
        stage = InferImages(teachers, allow_random_init=True, batch_size=args.teacher_batch, cpus=1, gpus=0,
                            torch_threads=1, device="cpu", decode=mode, request=request)
        stage.setup()
        stage.process_batch(batch)
        t0 = time.process_time()
        stage.process_batch(batch)
        out[f"decode_{mode}_cpu_ms_per_img"] = round(1000 * (time.process_time() - t0) / n, 3)
    return out


# ------------------------------------------------------------------ simulated device
def simulated_sections() -> dict[str, tuple[dict, dict | None]]:
    """The teachers the simulation runs: (section, upstream section it was recorded with)."""
    small = teacher_sections("small")
    glip = {**small["glip"], "mode": "caption", "vocabulary": None, "min_size": 800, "max_size": 1333}
    return {
        "maskclip": (small["maskclip"], None),
        "glip": (glip, None),
        "vild_dense": ({**small["vild_dense"], "max_regions": 300}, glip),
        "clip_embedding": ({**small["vild_crop"], "proposals": [{"meta_field": "proposals"}], "whole_image": True},
                           None),
    }


def _recording(name: str, section: dict, upstream: dict | None, blobs: list[bytes], source: str) -> tuple[str, dict]:
    from labelmill.models.common import config_hash

    from simdevice import record

    cache = Path(__file__).resolve().parents[1] / ".bench" / "sim"
    path = cache / f"{name}-{config_hash([section, upstream, source, len(blobs)])}.arrow"
    if path.is_file():
        return str(path), {"cached": True}
    print(f"[simulate] recording {name}'s device results on {len(blobs)} photos (once; cached)", flush=True)
    return str(path), record(section, blobs, str(path), upstream_section=upstream)


def _sim_run(shards: list[str], out: Path, section: dict, recording: str, ms: float, batch: int) -> dict:
    from labelmill.config import load_config

    from workload import cpu_ms_per_image, timed_run

    name = section.get("name") or section["type"]
    cfg = load_config({
        "input": {"shards": shards}, "output": {"path": str(out), "commit_every_shards": 2},
        "teachers": [{"type": "simdevice:SimulatedTeacher", "name": name, "teacher": section,
                      "recording": recording, "ms_per_batch": ms}],
        # a simulated device: the GPU plan's two calls per infer actor (a CPU plan's default is one)
        "ray": {"batch_size": batch, "device": "cpu", "infer_calls_per_actor": 2}, "allow_random_init": True,
        "progress_interval_s": 1,
    })
    summary, wall, rate, mem = timed_run(cfg, interval=1.0)
    by_process = mem.cpu_by_process()
    images = summary.counters.samples
    return {"images": images, "errors": summary.counters.error, "img_s": rate, "wall_s": wall,
            "infer_cpu_ms_per_img": cpu_ms_per_image(mem, "Infer", images),
            "finish_cpu_ms_per_img": cpu_ms_per_image(mem, "Finish", images),
            "cpu_s_by_process": by_process, "plan": summary.plan}


def simulate(args, work: Path, blobs: list[bytes], source: str) -> dict:
    """Per teacher: host capacity (no device time), then a device at ``args.device_share`` of it."""
    import ray

    bench_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (bench_dir, os.environ.get("PYTHONPATH")) if p)
    shards = build_shards(work / "shards", blobs, args.images, args.shards)
    wanted = args.sim_teachers.split(",")
    sections = simulated_sections()
    recordings = {n: _recording(n, *sections[n], blobs, source) for n in wanted}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False)
    out = {}
    try:
        for name in wanted:
            section = {**sections[name][0], "name": name}
            path, info = recordings[name]
            host = _sim_run(shards, work / f"{name}-host", section, path, 0.0, args.batch)
            device_rate = args.device_share * host["img_s"]
            ms = 1000 * args.batch / device_rate
            sim = _sim_run(shards, work / f"{name}-sim", section, path, ms, args.batch)
            out[name] = {"recording": info, "host_capacity_img_s": host["img_s"],
                         "simulated_device_img_s": device_rate, "ms_per_batch": ms,
                         "pipeline_img_s": sim["img_s"], "ratio": sim["img_s"] / device_rate,
                         "infer_cpu_ms_per_img": sim["infer_cpu_ms_per_img"],
                         "infer_cpu_ms_per_img_host_run": host["infer_cpu_ms_per_img"],
                         "finish_cpu_ms_per_img": sim["finish_cpu_ms_per_img"],
                         "runs": {"host": host, "simulated": sim}}
            brief = {k: round(v, 3) for k, v in out[name].items() if isinstance(v, float)}
            print(f"[simulate] {name}: {json.dumps(brief)}", flush=True)
            shutil.rmtree(work / f"{name}-host", ignore_errors=True)
            shutil.rmtree(work / f"{name}-sim", ignore_errors=True)
    finally:
        ray.shutdown()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--teacher-images", type=int, default=24)
    ap.add_argument("--teacher-batch", type=int, default=8)
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--in-process", action="store_true",
                    help="ceiling without Ray: the same stages, one process (for a box too loaded to start Ray)")
    ap.add_argument("--skip-teachers", action="store_true")
    ap.add_argument("--simulate-device", action="store_true",
                    help="only the simulated-device runs (see part 2 of the description)")
    ap.add_argument("--sim-teachers", default="maskclip,glip,vild_dense,clip_embedding",
                    help="with --simulate-device: which teachers (comma-separated)")
    ap.add_argument("--device-share", type=float, default=0.8,
                    help="with --simulate-device: simulated device rate as a share of the host capacity")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    blobs, source = photos()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "images_from": source,
        "command": "python benchmarks/bench_engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    work = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    try:
        if args.simulate_device:
            report["simulated_device"] = simulate(args, work, blobs, source)
        else:
            if not args.skip_ceiling:
                report["ceiling"] = ceiling(args, work, blobs)
            if not args.skip_teachers:
                report["teachers"] = teacher_costs(args, blobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
