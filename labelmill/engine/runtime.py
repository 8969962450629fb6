"""Ray start-up and the resource plan (the progress line is in :mod:`labelmill.engine.progress`)."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass

from labelmill.config import ConfigError, RayConfig


class RayStartError(RuntimeError):
    """Ray could not be started (embedded) or reached (``ray.address``): an infrastructure failure."""


@dataclass(frozen=True)
class ResourcePlan:
    """How the run's stages share the cluster: three pools.

    * **infer** (device actors): ``min_actors..max_actors`` actors, each with
      ``gpus_per_actor`` GPU (``1 / ray.actors_per_gpu``) and
      ``cpus_per_actor`` CPU, ``torch_threads`` intra-op threads;
    * **prepare** (CPU tasks, fused after the reader): up to ``read_tasks``
      at a time, ``read_cpus`` each;
    * **finish** (CPU actors, filter and table writer fused in):
      ``host_min..host_max`` actors, ``host_cpus`` each.

    On a GPU plan the two CPU pools are sized from the node:
    ``host_cpus_per_gpu`` CPUs per GPU in use (default: a GPU node's CPUs
    minus one, divided by its GPUs), half for preparing and half for
    finishing, so a GPU's throughput is never bounded by one Python process.

    CPU-only machines are where naive plans deadlock: two label actors with
    ``num_cpus=1`` on two CPUs leave nothing for the tasks that feed them.
    The plan therefore reserves fractional CPUs for the read/prepare tasks
    and the finish actor and gives the infer actors the rest, while the
    actors' torch thread count (what really uses the cores) is set
    separately.

    On a cluster reached by address the infer pool autoscales between
    ``min_actors`` and ``max_actors``; a teacher that wants a GPU asks for
    one even while no GPU node is up yet, so the cluster autoscaler starts
    GPU workers for the pending actors.
    """

    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    torch_threads: int
    read_tasks: int
    read_cpus: float
    total_cpus: float
    total_gpus: float
    autoscaling: bool = False
    note: str = ""
    host_min: int = 1
    host_max: int = 1
    host_cpus: float = 0.25
    host_cpus_per_gpu: float | None = None

    @property
    def actors(self) -> int:
        return self.max_actors

    def pools(self) -> dict[str, dict]:
        """Per role of a stateful operator: its actor pool bounds and one actor's resources."""
        return {
            "model": {"min": self.min_actors, "max": self.max_actors, "cpus": self.cpus_per_actor,
                      "gpus": self.gpus_per_actor, "threads": self.torch_threads},
            "host": {"min": self.host_min, "max": self.host_max, "cpus": self.host_cpus, "gpus": 0.0,
                     "threads": None},
        }

    def describe(self) -> str:
        dev = f"{self.gpus_per_actor:.3g} GPU" if self.gpus_per_actor else "CPU"

        def pool(lo: int, hi: int) -> str:
            return f"{lo}..{hi}" if lo != hi else f"{hi}"

        text = (
            f"{pool(self.min_actors, self.max_actors)} infer actor(s) x [{dev}, {self.cpus_per_actor:.3g} CPU, "
            f"{self.torch_threads} torch threads]; up to {self.read_tasks} read+prepare task(s) x {self.read_cpus:g} "
            f"CPU; {pool(self.host_min, self.host_max)} finish actor(s) x {self.host_cpus:g} CPU (RLE, label rows, "
            f"filter and table writer)"
        )
        if self.host_cpus_per_gpu is not None and self.gpus_per_actor:
            text += f"; {self.host_cpus_per_gpu:g} host CPUs per GPU"
        text += f"; cluster now {self.total_cpus:g} CPU, {self.total_gpus:g} GPU"
        return text + (f"; {self.note}" if self.note else "")


#: host CPUs per GPU when no GPU node can be seen to size the CPU pools from (a cluster still scaling up)
UNKNOWN_HOST_CPUS_PER_GPU = 4.0


def plan_resources(cfg: RayConfig, total_cpus: float, total_gpus: float, autoscaling: bool = False,
                   max_gpus: float | None = None, wants_gpu: bool = True,
                   node_host_cpus_per_gpu: float | None = None, max_node_cpus: float | None = None) -> ResourcePlan:
    """Decide the three pools and their reservations; raise ConfigError on a plan that cannot run.

    ``autoscaling``: the cluster was reached by address and may grow.
    ``max_gpus``: the most GPUs its autoscaler can provide (None: unknown).
    ``node_host_cpus_per_gpu``: (CPUs - 1) / GPUs of the GPU nodes seen (None: none seen).
    ``max_node_cpus``: the CPUs of the largest live node (an actor must fit one node).
    """
    note = ""
    can_have_gpus = total_gpus >= 1 or (autoscaling and (max_gpus is None or max_gpus >= 1))
    if cfg.device == "cpu" or not wants_gpu:
        gpus_per_actor = 0.0
    elif cfg.gpus_per_actor is not None:
        gpus_per_actor = cfg.gpus_per_actor
    else:
        gpus_per_actor = 1.0 / cfg.actors_per_gpu if can_have_gpus else 0.0
    if cfg.device == "cuda" and gpus_per_actor == 0:
        raise ConfigError("ray.device=cuda needs ray.gpus_per_actor > 0")
    if gpus_per_actor > 0 and total_gpus < gpus_per_actor and autoscaling:
        note = "no GPU visible yet: the infer actors wait for the cluster autoscaler to start GPU workers"

    if cfg.teacher_actors:
        lo = hi = cfg.teacher_actors
    elif gpus_per_actor > 0:
        fit = max(1, int(total_gpus / gpus_per_actor + 1e-9))
        if autoscaling:
            ceiling = int(max_gpus / gpus_per_actor + 1e-9) if max_gpus else fit
            hi = cfg.max_actors or max(fit, ceiling, 1)
            lo = cfg.min_actors or 1
        else:
            hi = cfg.max_actors or fit
            lo = cfg.min_actors or hi
    else:
        hi = cfg.max_actors or 1
        lo = cfg.min_actors or hi
    lo = min(lo, hi)
    read = cfg.read_cpus
    host_per_gpu = None
    if gpus_per_actor > 0:
        host_per_gpu = cfg.host_cpus_per_gpu or node_host_cpus_per_gpu or UNKNOWN_HOST_CPUS_PER_GPU
        gpus_used = max(hi * gpus_per_actor, 1.0 if hi else 0.0)
        host_total = host_per_gpu * gpus_used
        prepare = max(1, int(round(host_total / 2)))
        finish = cfg.finish_actors or max(1, int(math.ceil(host_total / 2)))
        finish_cpus = cfg.finish_cpus or 0.5
        if cfg.read_tasks_per_actor:
            prepare = max(1, int(round(cfg.read_tasks_per_actor * hi)))
        read_tasks = cfg.read_tasks or prepare
        reserve = read_tasks * read + finish * finish_cpus
        cpus = cfg.cpus_per_actor or 1.0 / cfg.actors_per_gpu
        threads = cfg.torch_threads or max(1, int(cpus))
        if not autoscaling and hi * gpus_per_actor > total_gpus + 1e-9:
            raise ConfigError(
                f"{hi} infer actors x {gpus_per_actor:g} GPU need more than the cluster's {total_gpus:g} GPUs"
            )
    else:
        finish = cfg.finish_actors or 1
        finish_cpus = cfg.finish_cpus or 0.25
        per_actor = cfg.read_tasks_per_actor or 1
        read_tasks = cfg.read_tasks or max(1, int(round(per_actor * hi)))
        reserve = read_tasks * read + finish * finish_cpus
        room = total_cpus - reserve
        if room <= 0 and not autoscaling:
            raise ConfigError(
                f"the cluster's {total_cpus:g} CPUs cannot hold the read/prepare and finish reservations "
                f"({reserve:g}); lower ray.read_tasks, ray.read_cpus or ray.finish_cpus"
            )
        cpus = cfg.cpus_per_actor or max(0.1, min(max(1.0, total_cpus / hi), room / hi, max_node_cpus or room))
        threads = cfg.torch_threads or max(1, int(math.floor(total_cpus / hi)))
    if not autoscaling and hi * cpus + reserve > total_cpus + 1e-9:
        raise ConfigError(
            f"resource plan would deadlock: {hi} infer actors x {cpus:g} CPU plus {reserve:g} CPU for the "
            f"read/prepare tasks and finish actors exceeds the cluster's {total_cpus:g} CPUs; lower "
            "ray.teacher_actors / ray.max_actors, ray.cpus_per_actor, ray.finish_actors or ray.host_cpus_per_gpu"
        )
    return ResourcePlan(lo, hi, gpus_per_actor, cpus, threads, read_tasks, read, total_cpus, total_gpus,
                        autoscaling, note, host_min=1, host_max=finish, host_cpus=finish_cpus,
                        host_cpus_per_gpu=host_per_gpu)


def node_host_cpus_per_gpu(nodes: list[dict]) -> float | None:
    """(CPUs - 1) / GPUs of the smallest live GPU node (``ray.nodes()`` entries), None if none is up."""
    per = [(n["Resources"].get("CPU", 0.0) - 1) / n["Resources"]["GPU"] for n in nodes
           if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    per = [p for p in per if p > 0]
    return min(per) if per else None


def verbose() -> bool:
    """The user asked for Ray's own output (``--verbose``, or ``LABELMILL_VERBOSE=1``)."""
    return os.environ.get("LABELMILL_VERBOSE", "") not in ("", "0")


#: Ray's C++ log lines: "[2026-01-01 10:00:00,123 W 123 123] core_worker.cc:2465: ..." (maybe "(raylet) "-prefixed)
_NATIVE_LOG = re.compile(rb"^(?:\x1b\[\d+m)?(?:\(\w+(?: pid=\d+)?\)(?:\x1b\[0m)? )?"
                         rb"\[\d{4}-\d\d-\d\d [\d:,]+ ([IWE]) \d+ \d+\] [\w.]+:\d+: (.*)")
#: error-level native lines that are warnings in all but name
_HARMLESS_ERRORS = (b"has constructor arguments in the object store",)
_filter_installed = False
_real_stderr: int | None = None  # the terminal's (or log's) fd 2 while the filter owns fd 2


def write_stderr_now(text: str) -> None:
    """Write ``text`` to the real stderr at once, past the filter's thread: for a last line before
    ``os._exit``, which would not wait for that thread to pass it on."""
    try:
        os.write(_real_stderr if _real_stderr is not None else 2, text.encode())
    except OSError:
        pass


#: ANSI escape sequences (Ray's coloured "(MapWorker pid=...)" prefixes, a status line's clear-line code)
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def native_line_hidden(line: bytes, tty: bool = True) -> bool:
    """Whether a line on stderr is one of Ray's C++ logs to keep off it: on a terminal the info and warning
    ones (and known harmless 'errors'); into a file or pipe every one (Ray's session logs keep them)."""
    m = _NATIVE_LOG.match(line)
    if not m:
        return False
    return not tty or m.group(1) in (b"I", b"W") or any(h in m.group(2) for h in _HARMLESS_ERRORS)


def filtered(lines: list[bytes], tty: bool) -> bytes:
    """What the stderr filter passes on of whole ``lines``: no hidden native lines; no ANSI codes off a TTY."""
    kept = [line for line in lines if not native_line_hidden(line, tty)]
    if not tty:
        kept = [_ANSI.sub(b"", line) for line in kept]
    return b"".join(line + b"\n" for line in kept)


def filter_native_stderr() -> None:
    """Route file descriptor 2 through a thread that drops Ray's C++ info/warning lines (all of them, and
    every ANSI colour code, when the real stderr is not a terminal: a log file gets plain text).

    Ray's core worker in this process writes its logs straight to fd 2 (the
    "constructor arguments in the object store" warning every actor pool
    triggers, for one), beyond Python's warnings and logging.  Everything
    else passes unchanged (a status line refreshed in place is passed on at
    once, not held for its newline).  :func:`start_ray` installs it right
    after ``ray.init`` when the command line asked for a quiet terminal
    (``LABELMILL_QUIET_STDERR=1``; never with ``--verbose``), so the Ray
    processes started by ``ray.init`` keep the real stderr and die with the
    driver as before.  At exit fd 2 is restored and the filter drained.
    """
    global _filter_installed, _real_stderr
    if verbose() or _filter_installed or os.name != "posix":
        return
    import atexit
    import threading

    from labelmill.engine import progress

    try:
        if sys.stderr.fileno() != 2:  # stderr is captured or redirected in Python: leave it alone
            return
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError, AttributeError):
        return
    tty = os.isatty(real)
    progress.STDERR_TTY = tty  # fd 2 becomes a pipe; the status line should still know
    _real_stderr = real
    os.dup2(write_end, 2)
    os.close(write_end)
    _filter_installed = True

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as src:
            pending = b""
            while True:
                chunk = src.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = filtered(lines, tty)
                if pending and not pending.startswith((b"[", b"\x1b[3", b"(")):
                    out, pending = out + pending, b""  # not a Ray log line: e.g. "\r" + a status line
                if out:
                    os.write(real, out)
            if pending and not native_line_hidden(pending, tty):
                os.write(real, pending if tty else _ANSI.sub(b"", pending))

    thread = threading.Thread(target=pump, name="labelmill-stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)  # closes the pipe's write end: the pump drains and stops
        thread.join(timeout=2)

    atexit.register(restore)


def quiet_ray_warnings() -> None:
    """Keep Ray's deprecation and actor-argument warnings off the user's terminal (unless verbose)."""
    if verbose():
        return
    import logging
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    for name in ("ray.data", "ray.data._internal", "ray._private.worker", "ray.util.annotations", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)  # raised in the caller's frame
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\..*)?")
    warnings.filterwarnings("ignore", message=r".*(deprecated|Deprecated|fn_constructor_args|large).*",
                            module=r"ray(\..*)?")


def start_ray(cfg: RayConfig, log_to_driver: bool = True) -> tuple[bool, bool]:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS`` or start an embedded local Ray.

    Returns ``(started_here, remote_cluster)``.  The embedded Ray is private
    to this process (``address="local"``) and its processes exit with it.
    ``log_to_driver=False`` keeps the workers' and actors' own output (Ray
    Train's controller logs, per-worker prints) in Ray's session logs, off
    this terminal (``--verbose`` lets it through).
    """
    log_to_driver = log_to_driver or verbose()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    global _REAPER

    quiet_ray_warnings()
    if ray.is_initialized():
        return False, False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    quiet = os.environ.get("LABELMILL_QUIET_STDERR") == "1"
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
            if quiet:
                filter_native_stderr()
            return True, True
        # address="local": always a private Ray for this process, never a cluster
        # someone else started on this host with `ray start`. The watcher starts first, so a kill -9
        # during Ray's own start-up leaves nothing running either.
        from labelmill.engine import reaper

        _REAPER = reaper.start()
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
            configure_logging=False,
        )
    except Exception as exc:  # noqa: BLE001 - any start-up failure is one clear line for the CLI
        # the watcher stays: when this driver exits with the error below, it ends what Ray had started
        where = f"the Ray cluster at {address!r}" if address else "an embedded local Ray"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RayStartError(f"could not start or reach {where}: {type(exc).__name__}: {first}") from exc
    if quiet:
        filter_native_stderr()
    return True, False


_REAPER = None


def stop_ray() -> None:
    """Shut down the Ray this process started (:func:`start_ray`) and its watcher."""
    global _REAPER
    import ray

    ray.shutdown()
    if _REAPER is not None:
        _REAPER.terminate()
        _REAPER.wait(timeout=10)
        _REAPER = None


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource the cluster autoscaler's node types can provide; None: no autoscaler known."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API; absence means "no autoscaler we can see"
        return None
    return {k: float(v or 0) for k, v in limits.items()} if limits else None


def autoscaler_present(limits: dict[str, float] | None = None, wait_s: float = 0.0) -> bool:
    """Whether the cluster has an autoscaler that can add nodes: its published node-type limits (autoscaler v2),
    or an ``autoscaler_report`` in the status the v1 monitor writes to the GCS key-value store every few seconds
    (waited for up to ``wait_s``). A head started without an autoscaling config runs the monitor too, but its
    status has no such report: it can add no node."""
    import json as _json
    import time as _time

    if limits is not None:
        return True
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    deadline = _time.monotonic() + wait_s
    while True:
        try:
            if _internal_kv_initialized():
                status = _internal_kv_get(b"__autoscaling_status")
                if status and _json.loads(status).get("autoscaler_report"):
                    return True
                if _internal_kv_get(b"AutoscalerMetricsAddress"):
                    return True
        except Exception:  # noqa: BLE001 - a private API: absence reads as "no autoscaler seen"
            pass
        if autoscaler_limits() is not None:
            return True
        if _time.monotonic() >= deadline:
            return False
        _time.sleep(0.5)


def cluster_max_gpus() -> float | None:
    """The most GPUs the cluster autoscaler's node types can provide; None if it is not known."""
    limits = autoscaler_limits()
    return None if limits is None else float(limits.get("GPU", 0.0))


def default_budget_mb(plan: ResourcePlan, batch_size: int, row_bytes: int) -> int:
    """Object-store room for eight forward batches of decoded images per actor, at least 256 MB.

    Measured on 2 CPUs with ViT-B/32: 64 MB starves the label actor (about
    15 img/s instead of 18); 256 MB keeps it fed.
    """
    return max(256, int(plan.actors * 8 * batch_size * row_bytes / 2**20) + 1)


def configure_ray_data(plan: ResourcePlan, budget_mb: int) -> None:
    """Quiet Ray Data's own output and cap its object-store use.

    Without the cap, reading and decoding race ahead of the label actors
    until half the object store holds decoded images: memory then grows
    with the dataset.  The cap makes Ray Data's backpressure hold the
    readers back, so memory stays flat whatever the number of shards.
    """
    from ray.data import DataContext
    from ray.data._internal.execution.interfaces import ExecutionResources

    ctx = DataContext.get_current()
    ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=budget_mb * 2**20)
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
