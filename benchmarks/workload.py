"""Shared by the engine benchmark and the GPU suite: images, shards, teachers, clocks.

Images: the 128 COCO photos in ../shared/data/coco128 when present, else
scikit-image's bundled sample photos re-encoded as JPEG at varied sizes
(no network needed), else synthetic gradients.  Teachers are random-init
(no model hub): real architectures (open_clip ViT-B/16, ViT-L/14, GLIP-T)
on the GPU, small ones ("small") for CPU runs.
"""

from __future__ import annotations

import glob
import io
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "images"
# photos bundled inside scikit-image's package (read from disk: no download is ever tried)
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "ihc.png", "hubble_deep_field.jpg",
                  "retina.jpg", "motorcycle_left.png", "color.png", "brick.png", "grass.png", "camera.png")
SIZES = ((640, 480), (480, 640), (1024, 768), (800, 600), (500, 375), (1280, 720), (333, 500), (640, 427))


def photos(limit: int | None = None) -> tuple[list[bytes], str]:
    """JPEG bytes of real photos and where they came from."""
    files = sorted(glob.glob(str(COCO128 / "*.jpg")))
    if files:
        return [Path(f).read_bytes() for f in files[:limit]], f"coco128 ({len(files[:limit])} photos)"
    from PIL import Image

    arrays = []
    try:
        import os

        from skimage import data

        for name in SKIMAGE_PHOTOS:
            try:
                arr = np.asarray(Image.open(os.path.join(data.data_dir, name)).convert("RGB"))
            except (OSError, ValueError) as exc:  # a photo this scikit-image build lacks: use the others
                print(f"[workload] skipping scikit-image photo {name}: {exc}", flush=True)
                continue
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, 2)
            arrays.append(arr[..., :3].astype(np.uint8))
    except ImportError:
        pass
    source = f"scikit-image samples ({len(arrays)} photos) at {len(SIZES)} sizes"
    if not arrays:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:480, 0:640]
        arrays = [np.stack([(x + 7 * k) % 256, (y * 3) % 256, rng.integers(0, 255, (480, 640))], -1).astype(np.uint8)
                  for k in range(8)]
        source = "synthetic gradients"
    out = []
    for k in range(max(len(arrays), len(SIZES)) * 2):
        arr = arrays[k % len(arrays)]
        w, h = SIZES[k % len(SIZES)]
        buf = io.BytesIO()
        Image.fromarray(arr).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out[:limit], source


def build_shards(folder: Path, blobs: list[bytes], n_images: int, n_shards: int) -> list[str]:
    from labelmill.io.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n_images // n_shards)
    paths, k = [], 0
    for s in range(n_shards):
        samples = []
        while len(samples) < per and k < n_images:
            samples.append((f"{k:08d}", {"jpg": blobs[k % len(blobs)], "txt": b"a person riding a horse near a car"}))
            k += 1
        paths.append(write_shard(str(folder / f"bench-{s:05d}.tar"), samples))
    return paths


SMALL_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}

COCO80 = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).replace("_", " ").split(" ")


def teacher_sections(scale: str) -> dict[str, dict]:
    """Teacher config sections: ``real`` (GPU suite: real architectures) or ``small`` (CPU)."""
    clip = {"model": "ViT-B-16"} if scale == "real" else {"arch_config": SMALL_CLIP}
    glip_arch = "glip_t" if scale == "real" else "tiny"
    glip_size = (800, 1333) if scale == "real" else (480, 800)
    vocab = "coco-stuff-171"
    return {
        "maskclip": {"type": "maskclip", "pretrained": None, **clip, "vocabulary": vocab, "templates": "single",
                     "image_size": 448, "logit_scale": 100.0},
        "glip": {"type": "glip", "architecture": glip_arch, "tokenizer": "builtin-test", "mode": "vocabulary",
                 "vocabulary": [c for c in COCO80 if c][:40], "min_size": glip_size[0], "max_size": glip_size[1],
                 # random weights score ~0.01; thresholds 0 give post-processing a trained model's load
                 "pre_nms_thresh": 0.0, "score_floor": 0.0, "max_detections_per_image": 100},
        "vild_dense": {"type": "vild", "pretrained": None, **clip, "mode": "dense", "dense_image_size": 448, "whole_image": True,
                       "proposals": [{"teacher": "glip"}]},
        "vild_crop": {"type": "vild", "pretrained": None, **clip, "mode": "crop", "whole_image": True, "max_regions": 32,
                      "proposals": [{"teacher": "glip"}]},
    }


class _Unwrap:
    """A handle that removes an instance-level wrapper (as a hook handle's ``remove``)."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name

    def remove(self) -> None:
        self.module.__dict__.pop(self.name, None)


class ForwardClock:
    """CPU time of this thread spent inside the networks' forward calls (nesting counted once)."""

    def __init__(self, modules):
        self.cpu = 0.0
        self.wall = 0.0
        self._depth = 0
        self._t0 = (0.0, 0.0)
        self._handles = []
        seen = set()
        for m in modules:
            for sub in (m, getattr(m, "visual", None)):
                if sub is not None and id(sub) not in seen:
                    seen.add(id(sub))
                    self._handles.append(sub.register_forward_pre_hook(self._enter))
                    self._handles.append(sub.register_forward_hook(self._leave))
            if hasattr(m, "forward_list"):  # DenseCLIP runs its blocks itself, outside Module.__call__
                self._wrap(m, "forward_list")

    def _wrap(self, module, name: str) -> None:
        inner = getattr(module, name)

        def timed(*args, **kwargs):
            self._enter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._leave()

        setattr(module, name, timed)
        self._handles.append(_Unwrap(module, name))

    def _enter(self, *args):
        if self._depth == 0:
            self._t0 = (time.thread_time(), time.perf_counter())
        self._depth += 1

    def _leave(self, *args):
        self._depth -= 1
        if self._depth == 0:
            self.cpu += time.thread_time() - self._t0[0]
            self.wall += time.perf_counter() - self._t0[1]

    def remove(self):
        for h in self._handles:
            h.remove()


class GpuSampler:
    """GPU utilisation samples (percent) every ``interval`` s: pynvml, else nvidia-smi."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.samples: list[float] = []
        self.errors: list[str] = []  # why a source was unusable or a reading failed (the first few are reported)
        self.source = "none"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = "pynvml"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:  # no pynvml or no driver: try nvidia-smi, say why
            self.errors.append(f"pynvml: {type(exc).__name__}: {exc}")
        import shutil
        import subprocess

        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"

            def read():
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True, text=True, timeout=5,
                )
                return float(out.stdout.strip().splitlines()[0])

            return read
        return None

    def _loop(self):
        read = self._reader()
        while read is not None and not self._stop.is_set():
            try:
                self.samples.append(read())
            except Exception as exc:  # one failed reading: count it, keep sampling
                self.errors.append(f"{self.source}: {type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def mean(self, skip: float = 0.2) -> float | None:
        """Mean over the samples after the first ``skip`` fraction (warm-up)."""
        s = self.samples[int(len(self.samples) * skip):]
        return float(np.mean(s)) if s else None


class MemorySampler:
    """Peak summed PSS of this process and all its descendants, and the CPU seconds each one used.

    Reading PSS (``/proc/<pid>/smaps_rollup``) of a dozen Ray processes every
    half second costs about a fifth of a core here, so a throughput run uses
    ``pss=False``: resident set sizes (summed, so shared pages count twice),
    and the CPU times, read every ``interval`` seconds from ``/proc/<pid>/stat``.
    """

    def __init__(self, interval: float = 0.5, pss: bool = True):
        self.interval = interval
        self.pss = pss
        self.peak = 0
        self.peak_driver_rss = 0
        self.breakdown: dict[str, float] = {}
        self.cpu_s: dict[int, tuple[str, float, float]] = {}  # pid -> (name, first reading, last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total, parts = 0, {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    size = p.memory_full_info().pss if self.pss else p.memory_info().rss
                    name = " ".join(p.cmdline()[:2])[-60:] if p.pid != me.pid else "driver"
                    cpu = p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += size
                parts[name] = parts.get(name, 0) + size / 2**20
                now = cpu.user + cpu.system
                self.cpu_s[p.pid] = (name, self.cpu_s.get(p.pid, (name, now, now))[1], now)
            if total > self.peak:
                self.peak, self.breakdown = total, parts
            self.peak_driver_rss = max(self.peak_driver_rss, me.memory_info().rss)
            self._stop.wait(self.interval)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds per process name while sampling (the driver's from the first reading on; a
        process started later counts from its own first reading, so a short-lived one is undercounted)."""
        out: dict[str, float] = {}
        for name, first, last in self.cpu_s.values():
            out[name] = out.get(name, 0.0) + (last - first if name == "driver" else last)
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed_run(cfg, pss: bool = False, interval: float | None = None):
    """``labelmill run`` of ``cfg`` (an already validated RunConfig) with its steady-state rate.

    Returns ``(summary, wall seconds, steady img/s, sampler)``: the steady rate is counted from the first
    to the last status update that saw samples (a run counted at one commit only gets its wall rate);
    ``sampler`` holds peak memory and CPU seconds per process (:class:`MemorySampler`).
    """
    import os

    from labelmill.engine.progress import Progress
    from labelmill.pipelines.label import run

    marks: list[tuple[float, int]] = []
    window: dict[str, dict] = {}  # CPU seconds per process at the first and the latest status update with samples
    original = Progress.update

    def spy(self, counters, committed, force=False):
        marks.append((time.monotonic(), counters.samples))
        if counters.samples > 0:
            window.setdefault("first", {"samples": counters.samples, "cpu": process_cpu()})
            window["last"] = {"samples": counters.samples, "cpu": process_cpu()}
        return original(self, counters, committed, force)

    Progress.update = spy
    try:
        with MemorySampler(interval or (0.5 if pss else 2.0), pss=pss) as mem:
            start = time.monotonic()
            summary = run(cfg, stream=open(os.devnull, "w"))
            wall = time.monotonic() - start
    finally:
        Progress.update = original
    counted = [(t, n) for t, n in marks if n > 0]
    if len(counted) >= 2 and counted[-1][1] > counted[0][1]:
        (t0, n0), (t1, n1) = counted[0], counted[-1]
        steady = (n1 - n0) / max(t1 - t0, 1e-9)
    else:
        steady = summary.counters.samples / wall
    mem.steady = window if "first" in window and window["last"]["samples"] > window["first"]["samples"] else None
    return summary, wall, steady, mem


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (process title, CPU seconds so far) of this process's descendants (Ray's workers included)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cpu = p.cpu_times()
            out[p.pid] = (" ".join(p.cmdline()[:2])[-60:], cpu.user + cpu.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_ms_per_image(mem: MemorySampler, marker: str, images: int) -> float:
    """CPU-ms per image of the processes whose title holds ``marker`` (``Infer``, ``Finish``: Ray's actor titles),
    over the steady state (from the first to the latest status update that saw samples: start-up, model load
    and the last batches' drain are outside), else over the whole run."""
    window = getattr(mem, "steady", None)
    if window:
        first, last = window["first"], window["last"]
        spent = sum(cpu - first["cpu"].get(pid, (name, 0.0))[1] for pid, (name, cpu) in last["cpu"].items()
                    if marker in name and pid in first["cpu"])
        return 1000 * spent / (last["samples"] - first["samples"])
    return 1000 * sum(v for k, v in mem.cpu_by_process().items() if marker in k) / max(images, 1)
