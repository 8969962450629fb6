"""The Ray Train loop shared by the students.

``fit`` starts a :class:`ray.train.torch.TorchTrainer` (DDP over gloo on CPU,
NCCL on GPU) whose workers each pull their share of the streamed dataset
with ``get_dataset_shard``.  Per optimizer step: gradient accumulation over
``grad_accum`` micro-batches, bf16 autocast on GPU, a warm-up + poly /
cosine / constant learning-rate schedule, and metrics (loss terms, lr,
samples/s) reported to Ray Train.  Every ``checkpoint.every_steps`` steps,
rank 0 writes a checkpoint (student files + optimizer + step) through Ray
Train to local or s3:// storage, and appends the steps' metrics to the
``metrics/`` Parquet table next to the checkpoints.  Running the same run
name again resumes from the last checkpoint: the step count continues.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
import time
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
LIVE_FILE = "live_weights.pt"  # with optim.ema: the trained (not averaged) weights, to resume from
METRICS_DIR = "metrics"


def make_task(kind: str, cfg: dict, extra: dict):
    if kind == "maskclip-plus":
        from labelmill.training.maskclip_plus import SegTask

        return SegTask(cfg, extra)
    if kind == "glip":
        from labelmill.training.glip import GroundingTask

        return GroundingTask(cfg, extra)
    raise ValueError(f"unknown training task {kind!r}")


def lr_factor(step: int, optim) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, optim.max_steps - optim.warmup_steps)
    t = min(1.0, (step - optim.warmup_steps) / span)
    if optim.schedule == "multistep":  # GLIP's WarmupMultiStepLR: x 0.1 at each milestone
        return 0.1 ** sum(step >= m * optim.max_steps for m in (0.67, 0.89))
    decay = 0.5 * (1 + math.cos(math.pi * t)) if optim.schedule == "cosine" else (1 - t) ** 0.9
    floor = min(getattr(optim, "min_lr", 0.0) / optim.lr, 1.0)  # mmcv: (lr - min_lr) * decay + min_lr
    return floor + (1 - floor) * decay


def storage(checkpoint) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    path = checkpoint.path
    if "://" not in path:
        return os.path.abspath(path), None
    import fsspec
    import pyarrow.fs as pafs

    fs, root = fsspec.core.url_to_fs(path, **checkpoint.storage_options)
    return root, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def run_dir(checkpoint) -> tuple[Any, str]:
    """(fsspec filesystem, path) of the run folder that holds checkpoints and metrics."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(checkpoint.path, **checkpoint.storage_options)
    if "://" not in checkpoint.path:
        root = os.path.abspath(root)
    return fs, posixpath.join(root, checkpoint.name)


def write_metrics(checkpoint, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    fs, root = run_dir(checkpoint)
    folder = posixpath.join(root, METRICS_DIR)
    fs.makedirs(folder, exist_ok=True)
    name = f"part-{rows[0]['step']:09d}-{rows[-1]['step']:09d}.parquet"
    keys = sorted({k for r in rows for k in r})
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    # written aside, then renamed: a kill mid-write leaves no half file for read_metrics
    tmp = posixpath.join(folder, f".{name}.tmp")
    with fs.open(tmp, "wb") as fh:
        pq.write_table(table, fh)
    fs.mv(tmp, posixpath.join(folder, name))


def read_metrics(run: str, name: str | None = None, storage_options: dict | None = None):
    """The metrics table of a run as pandas, one row per step (a re-run step keeps its latest row).

    ``run``: the run folder (``checkpoint.path/checkpoint.name``), or ``checkpoint.path`` with ``name``."""
    import fsspec
    import pandas as pd
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(run, **(storage_options or {}))
    if "://" not in run:
        root = os.path.abspath(root)
    folder = posixpath.join(root, name, METRICS_DIR) if name else posixpath.join(root, METRICS_DIR)
    files = sorted(fs.glob(posixpath.join(folder, "part-*.parquet"))) if fs.exists(folder) else []
    frames = []
    for f in files:
        with fs.open(f, "rb") as fh:
            frames.append(pq.read_table(fh).to_pandas())
    if not frames:
        return pd.DataFrame(columns=["step"])
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def saved_checkpoints(checkpoint) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in the run folder, the newest step first.

    Ray Train restores a run from its checkpoint-manager snapshot, which the
    controller writes only after it has processed a report: a driver killed
    with -9 in between leaves checkpoints on storage that the snapshot does
    not name.  The run folder itself is the record; a checkpoint counts once
    its state, model and optimizer files are all there.
    """
    fs, root = run_dir(checkpoint)
    found = []
    for state_path in fs.glob(posixpath.join(root, "checkpoint_*", STATE_FILE)) if fs.exists(root) else []:
        folder = posixpath.dirname(state_path)
        if not fs.exists(posixpath.join(folder, OPTIM_FILE)):
            continue
        try:
            with fs.open(state_path, "rb") as fh:
                step = int(json.load(fh)["step"])
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint cut short mid-copy
        found.append((step, folder))
    return sorted(found, reverse=True)


def _download(checkpoint, folder: str, into: str) -> str:
    fs, _ = run_dir(checkpoint)
    if "://" not in checkpoint.path:
        return folder
    fs.get(folder.rstrip("/") + "/", into, recursive=True)
    return into


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from labelmill.training.config import TASKS

    cfg = TASKS[config["task"]].model_validate(config["cfg"])
    task = make_task(config["task"], config["cfg"], config["extra"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    optim = cfg.optim
    torch.manual_seed(optim.seed + rank)
    if device.type == "cpu" and config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))

    model = task.build_model()
    state = {"step": 0, "samples": 0}
    ckpt = ray.train.get_checkpoint()
    optim_state = None
    ema_state: dict | None = None

    def restore(folder: str) -> None:
        nonlocal state, optim_state, ema_state
        ema_state = restore_weights(task, model, folder)
        with open(os.path.join(folder, STATE_FILE)) as fh:
            state = json.load(fh)
        optim_state = torch.load(os.path.join(folder, OPTIM_FILE), map_location="cpu", weights_only=True)

    restored = False
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            with open(os.path.join(folder, STATE_FILE)) as fh:
                ray_step = int(json.load(fh)["step"])
            # a newer checkpoint on storage than Ray's snapshot names: the driver was killed after writing it
            if not any(s > ray_step for s, _ in config.get("saved", [])):
                restore(folder)
                restored = True
    if not restored:
        for _, saved in config.get("saved", []):
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    restore(_download(cfg.checkpoint, saved, tmp))
                break
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: fall back to the one before
                print(f"[labelmill] checkpoint {saved} could not be loaded ({exc}); trying the one before")
                model = task.build_model()
                state, optim_state, ema_state = {"step": 0, "samples": 0}, None, None
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = getattr(model, "module", model)
    ema = WeightAverage(core, optim.ema, ema_state) if optim.ema else None
    groups = task.param_groups(core)
    for g in groups:
        g["lr"] = optim.lr * g.get("lr_scale", 1.0)
        g["base_lr"] = g["lr"]
    groups = [g for g in groups if g["params"]]
    if optim.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim_state is not None:
        opt.load_state_dict(optim_state)
    autocast = device.type == "cuda" and optim.bf16

    shard = ray.train.get_dataset_shard("train")
    gold = ray.train.get_dataset_shard("gold") if config.get("has_gold") else None
    step = start_step = int(state["step"])
    pending: list[dict] = []
    model.train()

    def save_checkpoint(metrics: dict) -> None:
        nonlocal pending
        if rank == 0:
            # the steps' metrics first: a kill between the two then re-runs steps whose rows exist
            # (a re-run step's row replaces its earlier one), never leaves checkpointed steps without rows
            write_metrics(cfg.checkpoint, pending)
            with tempfile.TemporaryDirectory() as tmp:
                if ema is not None:
                    torch.save(ema.save_served(task, core, tmp), os.path.join(tmp, LIVE_FILE))
                else:
                    task.save(core, tmp)
                torch.save(opt.state_dict(), os.path.join(tmp, OPTIM_FILE))
                with open(os.path.join(tmp, STATE_FILE), "w") as fh:
                    json.dump({"step": step, "samples": state["samples"], "task": config["task"],
                               "dataset": config["extra"].get("provenance", {})}, fh)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        pending = []

    last_ckpt = [int(state["step"]) or None]  # a restored step is a checkpoint's
    rate_from: list = [None, 0, 0]  # (time, step, samples) of a recent progress write: rates over recent steps

    def progress(metrics: dict, checkpointed: bool = False) -> None:
        """rank 0: the latest step for the driver's status line (progress.json in the run folder)."""
        if rank != 0 or config.get("attempt") is None:
            return
        from labelmill.training.watch import write_progress

        if checkpointed:
            last_ckpt[0] = step
        now = time.perf_counter()
        rate = samples_rate = None
        if rate_from[0] is not None and step > rate_from[1]:
            rate = (step - rate_from[1]) / max(now - rate_from[0], 1e-9)
            samples_rate = (state["samples"] - rate_from[2]) / max(now - rate_from[0], 1e-9)
        if rate_from[0] is None or now - rate_from[0] >= 10.0:  # over at least 10 s once warm
            rate_from[:] = [now, step, state["samples"]]
        try:
            write_progress(cfg.checkpoint, {
                "attempt": config["attempt"], "step": step, "max_steps": optim.max_steps, "start_step": start_step,
                "loss": metrics.get("loss"), "samples_per_s": samples_rate, "steps_per_s": rate,
                "checkpoint_step": last_ckpt[0]})
        except OSError:
            pass  # the status line only: never fail a training step over it

    gold_iter = None
    last_report = t_prev = time.perf_counter()
    while step < optim.max_steps:
        batches = iter(shard.iter_batches(batch_size=optim.batch_size, batch_format="numpy", drop_last=True))
        steps_this_epoch = 0
        while step < optim.max_steps:
            micro = []
            for _ in range(optim.grad_accum):
                b = next(batches, None)
                if b is None:
                    break
                if gold is not None:
                    b, gold_iter = task.mix_gold(b, gold, gold_iter)
                micro.append(b)
            ok = torch.tensor([1 if len(micro) == optim.grad_accum else 0])
            if world > 1:
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not int(ok):
                break  # some worker ran out: every worker starts the next pass together
            factor = lr_factor(step, optim)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            totals: dict[str, float] = {}
            n_samples = 0
            for i, b in enumerate(micro):
                inputs = task.inputs(b, device)
                sync = i == len(micro) - 1 or world == 1
                ctx_sync = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _null()
                with ctx_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, terms = task.loss(model, inputs, step)
                    (loss / len(micro)).backward()
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + v / len(micro)
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / len(micro)
                n_samples += task.batch_len(inputs)
            if optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(core.parameters(), optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(core)
            step += 1
            steps_this_epoch += 1
            state["samples"] += n_samples * world
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now  # the whole step: data wait, compute, reporting
            metrics = {"step": step, "lr": opt.param_groups[0]["lr"], "samples_per_s": n_samples * world / dt,
                       "samples": state["samples"], "start_step": start_step, **totals}
            pending.append(metrics)
            if step % cfg.checkpoint.every_steps == 0 or step == optim.max_steps:
                save_checkpoint(metrics)
                progress(metrics, checkpointed=True)
            elif time.perf_counter() - last_report >= cfg.report_interval_s:
                # Ray Train takes one report per worker per poll (about 2 s): reporting
                # every step would throttle training, so every step goes to the metrics
                # table and the latest step to Ray Train at this interval
                ray.train.report(metrics)
                progress(metrics)
                last_report = time.perf_counter()
        if steps_this_epoch == 0 and step < optim.max_steps:
            raise RuntimeError(
                f"a pass over the data gave no full batch: fewer than batch_size*grad_accum*workers = "
                f"{optim.batch_size * optim.grad_accum * world} usable samples per pass (raise data.repeat)")


def restore_weights(task, model, folder: str) -> dict | None:
    """Load a checkpoint's weights into ``model`` to train on; returns the weight average it kept, if any.

    With ``optim.ema`` the checkpoint's model file holds the average (what a teacher serves) and
    ``LIVE_FILE`` the trained weights: training resumes from those, and the average goes on from its own."""
    task.load(model, folder)
    live = os.path.join(folder, LIVE_FILE)
    if not os.path.exists(live):
        return None
    average = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(torch.load(live, map_location="cpu", weights_only=True))
    return average


class WeightAverage:
    """An exponential moving average of a model's weights (GLIP's MODEL_EMA): after every optimizer step
    ``avg = decay * avg + (1 - decay) * weights`` for floating-point tensors; other buffers are copied."""

    def __init__(self, model, decay: float, state: dict | None = None):
        self.decay = float(decay)
        source = state if state is not None else model.state_dict()
        device = next(model.parameters()).device
        self.state = {k: v.detach().clone().to(device) for k, v in source.items()}
        self._pairs: list | None = None  # (average, live tensor): the live ones share the model's storage

    def update(self, model) -> None:
        if self._pairs is None:  # once: state_dict() builds a fresh dict of views, which every step need not pay
            live = model.state_dict()
            self._pairs = [(self.state[k], live[k]) for k in self.state]
        with torch.no_grad():
            for avg, v in self._pairs:
                if avg.dtype.is_floating_point:
                    avg.mul_(self.decay).add_(v, alpha=1.0 - self.decay)
                else:
                    avg.copy_(v)

    def save_served(self, task, model, folder: str) -> dict:
        """Write the averaged weights as the checkpoint's model (what a teacher loads); returns the live
        weights (CPU), which stay in ``model`` for training to go on."""
        live = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            task.save(model, folder)
        finally:
            model.load_state_dict(live)
        return live


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_cluster_fits(cfg) -> None:
    """On a fixed-size cluster, refuse a scaling that leaves the data side no CPU (it would wait forever).

    Ray Train's workers reserve their CPUs for the whole run; the Ray Data
    side (one shard-reading task and the decode+target+augment actors) needs
    its own reservations beside them, or no step ever gets a batch.
    """
    import ray

    from labelmill.training.errors import ClusterTooSmall

    total = float(ray.cluster_resources().get("CPU", 0.0))
    sc, data = cfg.scaling, cfg.data
    trainer = sc.num_workers * sc.cpus_per_worker
    side = data.read_cpus + data.prepare_workers * data.prepare_cpus
    if trainer + side > total + 1e-9:
        raise ClusterTooSmall(
            f"the cluster has {total:g} CPU; the trainer reserves {trainer:g} (scaling.num_workers="
            f"{sc.num_workers} x scaling.cpus_per_worker={sc.cpus_per_worker:g}) and the data side needs "
            f"{side:g} more (data.read_cpus + data.prepare_workers x data.prepare_cpus), so no batch could "
            f"ever be prepared: lower scaling.cpus_per_worker or raise ray.num_cpus"
        )


#: set when Ctrl-C (SIGINT) reached the driver during fit: whatever Ray raises next is the interruption
INTERRUPTED = {"flag": False}


def _trainer_class(private: bool):
    """TorchTrainer with labelmill's Ctrl-C, and on the embedded private Ray without Ray Train's
    placement-group cleaner.

    Ctrl-C asks the controller to abort (as Ray Train does) and then raises KeyboardInterrupt in the
    driver, so the command prints where to resume and exits 130 (Ray Train's own handler exits 0 or 1).
    The cleaner is a detached actor that asks the state API whether the controller lives; with no address
    the state API picks "the latest cluster" on the host, so beside another Ray it printed "Found multiple
    active Ray instances" on the training terminal and could query the wrong cluster.  A private Ray ends
    with its driver, placement groups included, so there is nothing for the cleaner to do."""
    import signal

    import ray
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray layout: keep Ray Train's callbacks
        PlacementGroupCleanerCallback = None

    class LabelmillTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            found = super()._create_default_callbacks()
            if not private or PlacementGroupCleanerCallback is None:
                return found
            return [c for c in found if not isinstance(c, PlacementGroupCleanerCallback)]

        def _register_sigint_handler(self, controller):
            def on_sigint(signum, frame):
                if INTERRUPTED["flag"]:
                    raise KeyboardInterrupt
                INTERRUPTED["flag"] = True
                try:
                    ray.get(controller.abort.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - the controller (or the whole private Ray) is already gone
                    pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    return LabelmillTorchTrainer


def fit(cfg, datasets: dict, extra: dict, attempt: float | None = None, private: bool = False) -> dict:
    """Train with Ray Train; returns {checkpoint, step, metrics_path}.  ``attempt``: an id rank 0 writes
    into ``progress.json`` for the driver's status line; ``private``: the embedded Ray of this process."""
    import ray.train
    from ray.train.torch import TorchConfig

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1
    scaling = ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                      resources_per_worker=resources)
    path, fs = storage(cfg.checkpoint)
    run_config = ray.train.RunConfig(
        name=cfg.checkpoint.name, storage_path=path, storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        failure_config=ray.train.FailureConfig(max_failures=0),
    )
    loop_config = {"task": cfg.task, "cfg": cfg.model_dump(mode="json"), "extra": extra,
                   "has_gold": "gold" in datasets, "torch_threads": max(1, int(sc.cpus_per_worker)),
                   "saved": saved_checkpoints(cfg.checkpoint), "attempt": attempt}
    trainer = _trainer_class(private)(
        train_loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config,
        datasets=datasets, torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    INTERRUPTED["flag"] = False
    try:
        result = trainer.fit()
    except BaseException as exc:
        if INTERRUPTED["flag"] and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt from exc  # Ray's own reaction to the same Ctrl-C (a lost actor, an exit)
        raise
    ckpt = result.checkpoint
    return {"checkpoint": ckpt.path if ckpt is not None else None,
            "run_dir": run_dir(cfg.checkpoint)[1],
            "step": (result.metrics or {}).get("step")}
