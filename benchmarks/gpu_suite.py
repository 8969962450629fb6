"""Driver of benchmarks/gpu_suite.sh: one part per process, results as JSON, a Markdown report.

    python benchmarks/gpu_suite.py PART --out DIR [--dry-run]
    python benchmarks/gpu_suite.py report --out DIR

Parts (each writes DIR/PART.json; the shell script runs each under its own
timeout so one failure does not stop the rest):

* ``env``       -- GPU, driver, library versions;
* ``decode``    -- CPU decode (PIL, 1 process and a pool of all cores) vs GPU
                   decode (batched nvJPEG + resize, ``labelmill.io.images.decode_batch``);
* ``maskclip``  -- MaskCLIP ViT-B/16 @448;   ``glip`` -- GLIP-T at 800/1333;
* ``vild_dense``, ``vild_crop`` -- ViLD on GLIP-style boxes (whole image + 15 fixed boxes);
* ``embed_l14`` -- CLIP ViT-L/14 image embedding @224; ``embed_b16`` -- ViT-B/16 @224 with GPU decode.

For each model part, in images/s with GPU utilisation sampled during each
steady state (pynvml, else nvidia-smi):

* **bare forward**: the networks alone on ready, normalised device tensors,
  bf16 autocast, no post-processing;
* **infer stage** (in this process): ``InferImages.process_batch`` on raw
  JPEG bytes with ``decode="actor"`` (nvJPEG decode, teacher forward, device
  post-processing, one copy back, raw columns), its process CPU-ms per
  image, and the finish stage's CPU-ms per image on the same rows;
* **pipeline** (``labelmill run`` on this machine's local Ray, all its
  CPUs: read -> prepare -> infer -> finish -> filter -> write, Delta
  commits): steady-state images/s, GPU busy, the infer process's CPU-ms per
  image.  This is the figure the cost table uses.

``cost`` writes the 24M-pair cost table (GLIP-T + MaskCLIP + ViLD dense) from
the measured pipeline rates.  Models are random-init (no hub): same
architectures and shapes as the real ones, so speed is representative,
labels are not.

``--dry-run`` (or LABELMILL_GPU_DRY_RUN=1) runs everything on CPU with small
models, few images and short time boxes: it checks the suite, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


def ensure_labelmill() -> None:
    """Import labelmill; without an install, map its folders the way pyproject.toml does."""
    try:
        import labelmill.stages.infer  # noqa: F401
        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import labelmill

    if str(ROOT) not in labelmill.__path__:
        labelmill.__path__.append(str(ROOT))  # labelmill.stages -> ROOT/stages, labelmill.teachers -> ...
    import labelmill.stages.infer  # noqa: F401


ensure_labelmill()

import torch  # noqa: E402

from workload import COCO80, SMALL_CLIP, GpuSampler, build_shards, cpu_ms_per_image, photos, timed_run  # noqa: E402


class Settings:
    def __init__(self, dry: bool):
        self.dry = dry
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.seconds = 1.0 if dry else 8.0  # time box of each steady-state measurement
        self.images = 16 if dry else 1024  # rows handed to the label actor per call (parts may change it)
        self.scale = "small" if dry else "real"
        if dry:  # one thread: OpenMP spinning on a small shared CPU box distorts bare-forward timings
            torch.set_num_threads(1)

    def clip(self, model: str) -> dict:
        return {"arch_config": SMALL_CLIP} if self.dry else {"model": model}

    def batch(self, real: int) -> int:
        return 4 if self.dry else real

    def run_images(self, real: int) -> int:
        """Images of a ``labelmill run`` part: enough for a steady state of several seconds."""
        return 32 if self.dry else real


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_loop(fn, seconds: float, device, warmup: int = 2, min_iters: int = 3):
    """Iterations and wall seconds of ``fn`` run for about ``seconds`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        iters += 1
    sync(device)
    return iters, time.perf_counter() - t0


def raw_table(blobs: list[bytes], n: int):
    import pyarrow as pa

    from labelmill.schemas.tables import Col

    return pa.table({
        Col.KEY: [f"k{i:06d}" for i in range(n)], Col.SHARD: ["s"] * n,
        Col.IMAGE_BYTES: pa.array([blobs[i % len(blobs)] for i in range(n)], pa.binary()),
        Col.IMAGE_EXT: ["jpg"] * n,
        Col.CAPTION_BYTES: pa.array([b"a person riding a horse near a car"] * n, pa.binary()),
        Col.META_JSON: [json.dumps({"proposals": FIXED_BOXES}) for _ in range(n)],
        Col.ERROR: pa.array([None] * n, pa.string()),
        Col.WARNINGS: pa.array([[] for _ in range(n)], pa.list_(pa.string())),
    })


# 15 fixed boxes (xyxy, in original pixels of a >= 333x333 image) for ViLD's proposals
FIXED_BOXES = [[x, y, x + w, y + h] for x, y, w, h in
               [(10 + 20 * k, 5 + 15 * k, 60 + 10 * k, 50 + 8 * k) for k in range(15)]]


def pipeline(s: Settings, sections: list[dict], batch: int, blobs: list[bytes]) -> dict:
    """The infer stage in this process on raw JPEGs (decode in the actor): images/s, GPU busy, its CPU-ms/img;
    and the finish stage's CPU-ms/img on the same rows."""
    from labelmill.stages.finish import FinishLabels
    from labelmill.stages.infer import InferImages
    from labelmill.stages.prepare import PrepareInputs, merge_requests
    from labelmill.teachers.base import validate_teacher_config

    cfgs = [validate_teacher_config(sec) for sec in sections]
    request = merge_requests([c.image_request() for c in cfgs])
    stage = InferImages(cfgs, allow_random_init=True, batch_size=batch, cpus=16, gpus=1 if s.device.type == "cuda" else 0,
                        torch_threads=None, device=s.device.type, decode="actor", request=request)
    stage.setup()
    finish = FinishLabels(cfgs)
    finish.setup()
    table = PrepareInputs(request, 90_000_000, teachers=cfgs, decode=False).process_batch(raw_table(blobs, s.images))
    out = finish.process_batch(stage.process_batch(table))  # warm-up (and autotuning, compiles)
    errors = [e for e in out.column("error").to_pylist() if e]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed, first: {errors[0][:300]}")
    n_labels = sum(len(x) for x in out.column("labels").to_pylist()) + sum(
        len(x) for x in out.column("regions").to_pylist())
    with GpuSampler() as gpu:
        cpu0, t0, calls = time.process_time(), time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - t0 < s.seconds:
            inferred = stage.process_batch(table)
            calls += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    c0 = time.process_time()
    finish.process_batch(inferred)
    finish_cpu = time.process_time() - c0
    n = calls * s.images
    return {"img_s": n / wall, "gpu_busy": gpu.mean(), "gpu_source": gpu.source,
            "gpu_sampler_errors": gpu.errors[:3] + ([f"... {len(gpu.errors) - 3} more"] if len(gpu.errors) > 3 else []),
            "infer_cpu_ms_per_img": 1000 * cpu / n, "finish_cpu_ms_per_img": 1000 * finish_cpu / s.images,
            "outputs_per_img": n_labels / s.images, "images": n}


def ray_run(s: Settings, sections: list[dict], batch: int, blobs: list[bytes], images: int,
            decode: str = "tasks") -> dict:
    """``labelmill run`` on this machine's local Ray (all its CPUs and GPUs): steady img/s, GPU busy,
    CPU-ms per image of the infer and finish processes."""
    import shutil
    import tempfile

    from labelmill.config import load_config

    work = Path(tempfile.mkdtemp(prefix="gpu_suite_run_"))
    try:
        shards = build_shards(work / "shards", blobs, images, max(4, images // 512))
        cfg = load_config({
            "input": {"shards": shards}, "output": {"path": str(work / "out"), "commit_every_shards": 4},
            "teachers": sections, "ray": {"batch_size": batch, "device": s.device.type, "decode": decode},
            "allow_random_init": True, "progress_interval_s": 1,
        })
        with GpuSampler() as gpu:
            summary, wall, rate, mem = timed_run(cfg, interval=1.0)
        n = summary.counters.samples
        return {"img_s": rate, "wall_s": wall, "images": summary.counters.samples, "errors": summary.counters.error,
                "gpu_busy": gpu.mean(), "plan": summary.plan,
                "infer_cpu_ms_per_img": cpu_ms_per_image(mem, "Infer", n),
                "finish_cpu_ms_per_img": cpu_ms_per_image(mem, "Finish", n),
                "cpu_s_by_process": mem.cpu_by_process()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bare(s: Settings, fn, batch: int) -> dict:
    with GpuSampler() as gpu:
        iters, wall = timed_loop(fn, s.seconds, s.device)
    return {"img_s": iters * batch / wall, "gpu_busy": gpu.mean()}


def autocast(s: Settings):
    return torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.device.type == "cuda")


def in_autocast(s: Settings, call):
    """``call`` as a bare-forward step: inference mode, bf16 autocast on CUDA."""

    def step():
        with torch.inference_mode(), autocast(s):
            call()

    return step


def build(section: dict, s: Settings):
    from labelmill.teachers.base import build_teacher, validate_teacher_config

    return build_teacher(validate_teacher_config(section), s.device, allow_random_init=True)


# ------------------------------------------------------------------ parts
def part_env(s: Settings, blobs) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": s.device.type, "cpus": os.cpu_count(), "dry_run": s.dry}
    if s.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    import torchvision

    info["torchvision"] = torchvision.__version__
    for mod in ("open_clip", "pydantic", "pycocotools", "transformers", "pynvml"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as exc:  # reported, not fatal
            info[mod] = f"missing ({type(exc).__name__})"
    return info


def part_decode(s: Settings, blobs) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    from labelmill.io.images import decode_batch, decode_image
    from labelmill.schemas.records import ImageRequest

    request = ImageRequest(short_side=224, max_long_side=224)  # embedding size: decode dominates
    n = 64 if s.dry else 2048
    data = [blobs[i % len(blobs)] for i in range(n)]
    t0 = time.perf_counter()
    for d in data[: n // 4]:
        decode_image(d, request, 90_000_000)
    one_core = (n // 4) / (time.perf_counter() - t0)
    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_one, data[:workers], chunksize=1))  # start the workers
        t0 = time.perf_counter()
        list(pool.map(_decode_one, data, chunksize=16))
        all_cores = n / (time.perf_counter() - t0)
    out = {"cpu_1core_img_s": one_core, f"cpu_{workers}cores_img_s": all_cores, "cpu_cores": workers}
    batch = 8 if s.dry else 256
    chunks = [data[i : i + batch] for i in range(0, n, batch)]
    decode_batch(chunks[0], request, 90_000_000, s.device)  # warm-up (nvJPEG handles)
    with GpuSampler() as gpu:
        sync(s.device)
        t0 = time.perf_counter()
        for c in chunks:
            got = decode_batch(c, request, 90_000_000, s.device)
        sync(s.device)
        out["gpu_decode_img_s"] = n / (time.perf_counter() - t0)
    out["gpu_busy"] = gpu.mean()
    out["gpu_decode_device"] = s.device.type
    out["decoded_shape_example"] = list(got[0].pixels.shape)
    return out


def _decode_one(data: bytes):
    from labelmill.io.images import decode_image
    from labelmill.schemas.records import ImageRequest

    return decode_image(data, ImageRequest(short_side=224, max_long_side=224), 90_000_000).pixels.shape


def part_maskclip(s: Settings, blobs) -> dict:
    s.images = 16 if s.dry else 512
    sec = {"type": "maskclip", "pretrained": None, **s.clip("ViT-B-16"), "vocabulary": "coco-stuff-171",
           "templates": "single", "image_size": 448, "logit_scale": 100.0, "batch_size": s.batch(64)}
    teacher = build(sec, s)
    b = s.batch(64)
    x = torch.randn(b, 3, 448, 448, device=s.device)

    fwd = in_autocast(s, lambda: teacher.dense(x))

    return {"model": "ViT-B/16 @448 (random init)", "batch": b, "bare": bare(s, fwd, b),
            "infer_stage": pipeline(s, [sec], b, blobs), "pipeline": ray_run(s, [sec], b, blobs, s.run_images(4096))}


def glip_section(s: Settings, batch: int) -> dict:
    return {"type": "glip", "architecture": "tiny" if s.dry else "glip_t", "tokenizer": "builtin-test",
            "mode": "vocabulary", "vocabulary": [c for c in COCO80 if c][:40],
            "min_size": 64 if s.dry else 800, "max_size": 128 if s.dry else 1333,
            "pre_nms_thresh": 0.0, "score_floor": 0.0, "max_detections_per_image": 100,
            "max_batch_size": batch, "batch_size": batch, "canvas_sizes": None if s.dry else [[800, 1344], [1344, 800]]}


def part_glip(s: Settings, blobs) -> dict:
    s.images = 16 if s.dry else 96
    b = s.batch(8)
    sec = glip_section(s, b)
    teacher = build(sec, s)
    model = teacher.predictor.model
    h, w = (64, 128) if s.dry else (800, 1344)
    x = torch.randn(b, 3, h, w, device=s.device)
    prompt = teacher.vocab_prompts[0]  # tokenised once per actor
    from labelmill.models.glip.text import encode_tokenized

    enc = encode_tokenized([prompt] * b, model.cfg.max_query_len, False, teacher.tokenizer.pad_token_id or 0)
    ids, mask = enc.input_ids.to(s.device), enc.attention_mask.to(s.device)

    fwd = in_autocast(s, lambda: model(x, ids, mask))

    return {"model": f"GLIP-T {h}x{w} canvas, 40-class prompt (random init)", "batch": b,
            "bare": bare(s, fwd, b), "infer_stage": pipeline(s, [sec], b, blobs),
            "pipeline": ray_run(s, [sec], b, blobs, s.run_images(1024))}


def vild_section(s: Settings, mode: str, batch: int) -> dict:
    sec = {"type": "vild", "pretrained": None, **s.clip("ViT-B-16"), "mode": mode, "whole_image": True,
           "proposals": [{"meta_field": "proposals"}], "batch_size": batch}
    if mode == "crop":
        sec.update(crop_scales=[1.0, 1.5], crop_batch_size=s.batch(512), work_short_side=448, work_max_long_side=768)
    else:
        sec.update(dense_image_size=448)
    return sec


def part_vild_dense(s: Settings, blobs) -> dict:
    s.images = 16 if s.dry else 512
    b = s.batch(64)
    sec = vild_section(s, "dense", b)
    teacher = build(sec, s)
    x = torch.randn(b, 3, 448, 448, device=s.device)

    fwd = in_autocast(s, lambda: teacher.dense(x))

    return {"model": "ViT-B/16 dense @448, 16 boxes/img (random init)", "batch": b, "bare": bare(s, fwd, b),
            "infer_stage": pipeline(s, [sec], b, blobs), "pipeline": ray_run(s, [sec], b, blobs, s.run_images(4096))}


def part_vild_crop(s: Settings, blobs) -> dict:
    s.images = 16 if s.dry else 256
    b = s.batch(32)
    sec = vild_section(s, "crop", b)
    teacher = build(sec, s)
    crops = 32 * b if not s.dry else 8  # 16 boxes x 2 scales per image
    x = torch.randn(crops, 3, 224, 224, device=s.device)

    fwd = in_autocast(s, lambda: teacher.clip.encode_image(x))

    out = {"model": "ViT-B/16 @224 crops, 16 boxes x 2 scales/img (random init)", "batch": b}
    out["bare"] = bare(s, fwd, b)
    out["infer_stage"] = pipeline(s, [sec], b, blobs)
    return out


def embed(s: Settings, blobs, model: str, batch: int) -> dict:
    sec = {"type": "vild", "pretrained": None, **s.clip(model), "mode": "crop", "whole_image": True,
           "proposals": [{"meta_field": "none"}], "crop_scales": [1.0], "crop_batch_size": batch,
           "work_short_side": 224, "work_max_long_side": 224, "batch_size": batch}
    teacher = build(sec, s)
    x = torch.randn(batch, 3, 224, 224, device=s.device)

    fwd = in_autocast(s, lambda: teacher.clip.encode_image(x))

    out = {"model": f"{model} @224 image embedding (ViLD whole-image crop; random init)", "batch": batch,
           "bare": bare(s, fwd, batch), "infer_stage": pipeline(s, [sec], batch, blobs)}
    if model == "ViT-B-16":  # nvJPEG in the infer actor: the embedding goal's setting
        out["pipeline"] = ray_run(s, [sec], batch, blobs, s.run_images(16384), decode="actor")
    return out


def part_embed_l14(s: Settings, blobs) -> dict:
    s.images = 16 if s.dry else 2048
    return embed(s, blobs, "ViT-L-14", s.batch(256))


def part_embed_b16(s: Settings, blobs) -> dict:
    s.images = 16 if s.dry else 4096
    return embed(s, blobs, "ViT-B-16", s.batch(512))


PARTS = {name[5:]: fn for name, fn in globals().items() if name.startswith("part_")}
GOALS = {"embed_l14": 2500, "embed_b16": 8000}


# ------------------------------------------------------------------ report
def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


#: the mission: 24M caption pairs, labelled by GLIP-T, MaskCLIP and ViLD dense
MISSION_IMAGES = 24_000_000
MISSION_TEACHERS = ("glip", "maskclip", "vild_dense")


def cost_table(out: Path) -> list[str]:
    """GPU-hours for 24M images x (GLIP-T + MaskCLIP + ViLD dense) at the measured rates, one GPU per actor."""
    lines = ["", f"Cost of {MISSION_IMAGES / 1e6:.0f}M images x ({' + '.join(MISSION_TEACHERS)}), one GPU, "
             "teachers run one after another (their hours add up):", "",
             "| teacher | pipeline img/s (labelmill run) | GPU-hours | at 0.9 x bare forward |", "|---|---|---|---|"]
    total = total_bare = 0.0
    missing = []
    for name in MISSION_TEACHERS:
        res = _load(out, name).get("result") or {}
        p, b = (res.get("pipeline") or {}).get("img_s"), (res.get("bare") or {}).get("img_s")
        if not p or not b:
            missing.append(name)
            lines.append(f"| {name} | not measured | – | – |")
            continue
        hours, hours_bare = MISSION_IMAGES / p / 3600, MISSION_IMAGES / (0.9 * b) / 3600
        total += hours
        total_bare += hours_bare
        lines.append(f"| {name} | {fmt(p)} | {fmt(hours, 1)} | {fmt(hours_bare, 1)} |")
    if missing:
        lines.append(f"| **total** | – | incomplete ({', '.join(missing)} not measured) | – |")
    else:
        verdict = "met" if total <= 50 else "missed"
        lines.append(f"| **total** | – | **{fmt(total, 1)}** (goal <= 50 H100-hours: {verdict}) | {fmt(total_bare, 1)} |")
    return lines


def report(out: Path) -> str:
    rows = []
    env = _load(out, "env")
    lines = ["# labelmill GPU suite", ""]
    if env.get("result"):
        e = env["result"]
        lines.append(f"Machine: {e.get('gpu', e.get('device'))}, {e.get('cpus')} CPUs; torch {e.get('torch')} "
                     f"(CUDA {e.get('cuda')}), torchvision {e.get('torchvision')}; dry run: {e.get('dry_run')}.")
        lines.append("")
    lines += ["| part | model | batch | bare forward img/s | infer stage img/s (1 process) | pipeline img/s "
              "(labelmill run) | pipeline / bare | GPU busy bare | GPU busy pipeline | infer CPU-ms/img | "
              "finish CPU-ms/img | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in PARTS:
        if name in ("env", "decode"):
            continue
        r = _load(out, name)
        res = r.get("result") or {}
        b, st, p = res.get("bare", {}), res.get("infer_stage", {}), res.get("pipeline") or {}
        best = p or st
        ratio = best["img_s"] / b["img_s"] if best.get("img_s") and b.get("img_s") else None
        goal = GOALS.get(name)
        status = r.get("status", "not run")
        if goal and best.get("img_s"):
            status += f"; goal {goal:,} img/s {'met' if best['img_s'] >= goal else 'missed'}"
        rows.append(f"| {name} | {res.get('model', '')} | {res.get('batch', '')} | {fmt(b.get('img_s'))} | "
                    f"{fmt(st.get('img_s'))} | {fmt(p.get('img_s'))} | {fmt(ratio, 2)} | {fmt(b.get('gpu_busy'))} % | "
                    f"{fmt(best.get('gpu_busy'))} % | {fmt(best.get('infer_cpu_ms_per_img'), 2)} | "
                    f"{fmt(best.get('finish_cpu_ms_per_img'), 2)} | {status} |")
    lines += rows
    d = _load(out, "decode")
    lines += ["", "| decode @224 | img/s |", "|---|---|"]
    for k, v in (d.get("result") or {}).items():
        if k.endswith("img_s"):
            lines.append(f"| {k} | {fmt(v)} |")
    if d.get("status") != "ok":
        lines.append(f"| decode part | {d.get('status', 'not run')} |")
    lines += cost_table(out)
    lines += ["", "Goals (one H100): pipeline >= 0.9 x bare forward, GPU busy >= 90 %, GLIP-T bare >= 150 img/s, "
              "ViT-B/16 embedding with GPU decode >= 8,000 img/s, 24M x 3 teachers <= 50 H100-hours.  Random-init "
              "models: speed is representative, labels are not.  Errors are in the part logs.", ""]
    text = "\n".join(lines)
    (out / "gpu_results.md").write_text(text)
    return text


def _load(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    if not path.exists():
        return {"status": "not run (no result file: crashed or timed out, see its log)"}
    return json.loads(path.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=[*PARTS, "report"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("LABELMILL_GPU_DRY_RUN") == "1")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        print(report(out))
        return 0
    s = Settings(args.dry_run)
    torch.manual_seed(0)
    record = {"part": args.part, "status": "ok"}
    t0 = time.perf_counter()
    try:
        blobs, source = photos()
        record["images_from"] = source
        record["result"] = PARTS[args.part](s, blobs)
    except Exception as exc:
        record["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        traceback.print_exc()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    (out / f"{args.part}.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, default=str), flush=True)
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
