"""The engine: runs a pipeline of stages on Ray and commits what its writers report.

A :class:`Pipeline` is an ordered list of named stages, each declaring the
columns it requires and produces, its resources, whether it keeps state
(an actor pool) and its role (``source``, ``model``, ``write``,
``transform``).  :class:`Engine` owns everything about running one:

* checking every hop's column contract before any work starts;
* connecting to a cluster (``ray.address`` / ``$RAY_ADDRESS``) or starting
  a private embedded Ray, with Ray's warnings kept off the terminal;
* the resource plan (actor pool bounds, GPUs, CPU reservations), placed on
  the stages;
* operator fusion: a stateless stage runs inside the operator before it
  (the filter and the table writer run in the label actors);
* the object-store budget (Ray Data backpressure keeps memory flat);
* retries: Ray Data's own (failed tasks are retried and dead actors
  restarted without limit); the replayed rows are dropped by the commit
  loop, so nothing is doubled;
* the shard ledger: a small actor the source reports each shard's sample
  count to, out of band of the data;
* progress, and the commit loop (:class:`~labelmill.engine.commit_loop.CommitLoop`).

Pipelines (``labelmill.pipelines``) only compose stages; they never import Ray.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Iterator, Sequence

from labelmill.config import RayConfig
from labelmill.engine.commit_loop import CommitLoop, RunCounters
from labelmill.engine.progress import Progress, StageMeter, StageTotals
from labelmill.engine.runtime import (
    ResourcePlan,
    autoscaler_limits,
    autoscaler_present,
    cluster_max_gpus,
    configure_ray_data,
    default_budget_mb,
    node_host_cpus_per_gpu,
    plan_resources,
    start_ray,
    stop_ray,
)
from labelmill.stages.base import Resources, Stage, check_contract


class Pipeline:
    """An ordered list of named stages; the first has role ``source``."""

    def __init__(self, name: str, stages: Sequence[Stage]):
        self.name = name
        self.stages = list(stages)
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pipeline {name!r}: stage names must be unique, repeated: {dupes}")
        if not self.stages or self.stages[0].role != "source":
            raise ValueError(f"pipeline {name!r} must start with a source stage")

    def find(self, *, name: str | None = None, role: str | None = None) -> Stage:
        hits = [s for s in self.stages if (name is None or s.name == name) and (role is None or s.role == role)]
        if len(hits) != 1:
            raise LookupError(f"pipeline {self.name!r} has {len(hits)} stage(s) named {name!r} / role {role!r}")
        return hits[0]

    def has(self, role: str) -> bool:
        return any(s.role == role for s in self.stages)

    @property
    def source(self) -> Stage:
        return self.find(role="source")

    def check(self) -> list[str]:
        """Check every hop's column contract; returns the columns reaching the driver."""
        return check_contract(self.stages)


def pool_of(stage: Stage) -> str:
    """Which of the plan's actor pools a stateful stage runs in: the device pool, or the host (CPU) pool."""
    return "model" if stage.role == "model" else "host"


def fuse(stages: Sequence[Stage]) -> list[list[Stage]]:
    """Group stages into Ray operators: a stateless stage joins the operator before it."""
    groups: list[list[Stage]] = []
    for stage in stages:
        if groups and not stage.stateful and stage.batch_format == groups[-1][-1].batch_format:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


class _Chain:
    """Runs several fused stages back to back in one Ray worker (one operator).

    Each stage's rows and busy seconds are counted (:class:`StageMeter`) and
    sent to the engine's meter actor when ``meter`` (a :class:`_MeterClient`) is set.
    """

    METER = None

    def __init__(self, stages: Sequence[Stage], meter=None):
        self.stages = list(stages)
        self.meter = meter if meter is not None else type(self).METER
        self._ready = False
        self._counts: StageMeter | None = None

    def _setup(self) -> None:
        if not self._ready:
            from labelmill.engine.runtime import quiet_ray_warnings

            quiet_ray_warnings()
            for stage in self.stages:
                stage.setup()
            self._ready = True

    def __call__(self, batch):
        self._setup()
        if self.meter is None:
            for stage in self.stages:
                batch = stage.process_batch(batch)
            return batch
        if self._counts is None:
            self._counts = StageMeter(self.meter)
        for stage in self.stages:
            rows, t0 = len(batch), time.perf_counter()
            batch = stage.process_batch(batch)
            self._counts.add(stage.name, rows, time.perf_counter() - t0)
        return batch


class _ActorChain(_Chain):
    """Callable class Ray Data instantiates once per actor; setup happens there.

    The stages travel as a class attribute of a subclass made per operator
    (:func:`actor_class`), not as constructor arguments: Ray keeps large
    constructor arguments in the object store and warns about every
    restartable actor that has them.
    """

    STAGES: list = []

    def __init__(self):
        super().__init__(type(self).STAGES)
        self._setup()


def actor_class(stages: Sequence[Stage], meter=None) -> type:
    name = "".join(s.name.title() for s in stages) + "Actor"
    return type(name, (_ActorChain,), {"STAGES": list(stages), "METER": meter, "__module__": __name__})


class _MeterClient:
    """What a worker's :class:`StageMeter` sends through: one fire-and-forget call to the meter actor."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(self, deltas: dict) -> None:
        self.handle.add.remote(deltas)


def _meter_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class StageMeterActor:
        """stage -> (rows, busy seconds), summed over every worker."""

        def __init__(self):
            self.totals: dict[str, list] = {}

        def add(self, deltas: dict) -> None:
            for stage, (rows, seconds) in deltas.items():
                entry = self.totals.setdefault(stage, [0, 0.0])
                entry[0] += rows
                entry[1] += seconds

        def get(self) -> dict:
            return {k: tuple(v) for k, v in self.totals.items()}

    return StageMeterActor


def shown_stages(pipeline: "Pipeline") -> list[str]:
    """The stages the progress line shows: each operator's first stage, and the writer."""
    names = [pipeline.source.name]
    for group in fuse(pipeline.stages[1:]):
        names += [s.name for s in group if s is group[0] or s.role == "write"]
    return names


class _LedgerClient:
    """What the source calls when a shard is read: one small call to the ledger actor."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(self, shard: str, rows: int, duplicates: int, failed: str | None = None) -> None:
        import ray

        ray.get(self.handle.report.remote(shard, rows, duplicates, failed))


def _ledger_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class ShardLedger:
        """Shard -> (samples, duplicates, failed), reported by the source tasks (idempotent)."""

        def __init__(self):
            self.totals: dict[str, tuple[int, int, str | None]] = {}

        def report(self, shard: str, rows: int, duplicates: int, failed: str | None = None) -> None:
            self.totals[shard] = (rows, duplicates, failed)

        def since(self, known: int) -> list[tuple[str, int, int, str | None]]:
            items = list(self.totals.items())
            return [(s, r, d, f) for s, (r, d, f) in items[known:]]

    return ShardLedger


class _Ticker:
    """Calls ``fn`` every ``interval`` seconds on a daemon thread until stopped (errors are ignored)."""

    def __init__(self, interval: float, fn):
        import threading

        self._stop = threading.Event()
        self._fn = fn
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="labelmill-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._fn()
            except Exception:  # noqa: BLE001 - progress must never break a run
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class PipelineStalled(RuntimeError):
    """No progress while some stage's work fits on no live node (``ray.stall_timeout_s``)."""


def unschedulable(requests: dict[str, dict[str, float]], nodes: list[dict]) -> dict[str, dict[str, float]]:
    """The operators whose one-worker request fits on no live node, with what the best node lacks.

    ``nodes`` as ``ray.nodes()`` returns them (``Alive``, ``Resources``: the node's totals).
    """
    live = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    out = {}
    for name, need in requests.items():
        if any(all(node.get(k, 0.0) >= v - 1e-9 for k, v in need.items()) for node in live):
            continue
        best: dict[str, float] | None = None
        for node in live or [{}]:
            lacks = {k: v - node.get(k, 0.0) for k, v in need.items() if node.get(k, 0.0) < v - 1e-9}
            if best is None or len(lacks) < len(best):
                best = lacks
        out[name] = best or {}
    return out


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()))


class StallWatch:
    """Fails a run that makes no progress while work it waits for fits on no live node.

    Progress is a batch reaching the driver or a shard finishing.  After
    ``timeout`` seconds without progress, the live nodes (``ray.nodes()``; no
    dashboard needed) are checked against what one worker of every operator
    needs.  If some operator fits nowhere (the only GPU node died, a custom
    resource no node has), the run fails with :class:`PipelineStalled` naming
    the missing resources.  On an autoscaling cluster it first says it is
    waiting for nodes, and fails after twice the timeout.  Slow but
    schedulable work (a teacher loading its weights) never trips it.
    """

    def __init__(self, timeout: float, requests: dict[str, dict[str, float]], autoscaling: bool | None, stream,
                 nodes=None, limits: dict[str, float] | None = None):
        self.timeout = timeout
        self.requests = requests
        self.autoscaling = autoscaling
        self.limits = limits
        self.stream = stream
        self.nodes = nodes
        self.last = time.monotonic()
        self.warned = False
        self.error: PipelineStalled | None = None

    @contextlib.contextmanager
    def watching(self, every: float = 1.0) -> Iterator[None]:
        """Check in a thread while the block runs; a stall interrupts the block (KeyboardInterrupt in the
        main thread, so Ray Data's iterator unwinds normally) and sets :attr:`error`."""
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread can be interrupted; elsewhere a stall is not detected
            return
        done = threading.Event()

        def watch() -> None:
            while not done.wait(every):
                try:
                    self.check()
                except PipelineStalled as exc:
                    self.error = exc
                    self._stop_main(done)
                    return
                except Exception:  # noqa: BLE001 - e.g. Ray shutting down: the watch just ends
                    return

        thread = threading.Thread(target=watch, name="labelmill-stall-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)

    def _stop_main(self, done: threading.Event, grace_s: float = 30.0) -> None:
        """Make the main thread give up: interrupt it; if it is stuck where an interrupt is not seen (a wait
        inside Ray), send the process SIGINT; as the last resort print the one line and exit (code 1)."""
        import _thread
        import os
        import signal

        _thread.interrupt_main()
        if done.wait(grace_s):
            return
        os.kill(os.getpid(), signal.SIGINT)
        if done.wait(grace_s):
            return
        from labelmill.engine.runtime import write_stderr_now

        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        write_stderr_now(f"\nlabelmill: {self.error}\n")  # past the stderr filter's thread: os._exit will not wait
        os._exit(1)

    def progressed(self) -> None:
        self.last = time.monotonic()
        self.warned = False

    def check(self) -> None:
        idle = time.monotonic() - self.last
        if idle < self.timeout:
            return
        if self.nodes is None:
            import ray

            nodes = ray.nodes()
        else:
            nodes = self.nodes()
        missing = unschedulable(self.requests, nodes)
        if not missing:
            return
        what = "; ".join(f"{name} workers need {{{_fmt(self.requests[name])}}} each, no live node has "
                         f"{{{_fmt(lacks)}}}" for name, lacks in missing.items())
        live = sum(1 for n in nodes if n.get("Alive"))
        if self.autoscaling is None:  # a cluster reached by address: is an autoscaler there by now?
            self.autoscaling = autoscaler_present(self.limits)
        # wait for an autoscaler only if its node types can provide what is missing
        can_add = self.autoscaling and (self.limits is None or all(
            self.limits.get(k, 0.0) >= self.requests[name].get(k, 0.0) for name, lacks in missing.items()
            for k in lacks))
        if can_add and not self.warned:
            self.warned = True
            print(f"[labelmill] waiting for nodes: no progress for {idle:.0f}s; {what} ({live} live nodes); "
                  "waiting for the cluster autoscaler to add such nodes", file=self.stream, flush=True)
            return
        if can_add and idle < 2 * self.timeout:
            return
        hint = ("the cluster autoscaler added no such node" if can_add
                else "no autoscaler can add such a node: add one, or change the ray section of the config")
        raise PipelineStalled(
            f"pipeline stalled: no progress for {idle:.0f}s (ray.stall_timeout_s={self.timeout:g}); {what} "
            f"({live} live nodes); {hint}. Committed shards are kept: re-run the same command to resume"
        )


class Engine:
    """Runs pipelines on Ray; see the module docstring."""

    def __init__(self, ray_config: RayConfig, *, batch_size: int, progress_interval_s: float | None = None,
                 stream=None):
        self.cfg = ray_config
        self.batch_size = batch_size
        self.progress_interval_s = progress_interval_s
        self.stream = stream or sys.stderr
        self.plan: ResourcePlan | None = None
        self.budget_mb: int | None = None
        self._remote: bool | None = None  # set while a session() holds Ray

    @contextlib.contextmanager
    def session(self, needed: bool = True) -> Iterator[None]:
        """Hold Ray (connected or embedded) for the block; ``run`` inside it reuses that Ray.

        A pipeline opens the session before it writes anything, so a cluster
        that cannot be reached fails the run (:class:`RayStartError`) with
        nothing written.  ``needed=False`` (nothing to do) starts no Ray.
        """
        if not needed:
            yield
            return
        started_here, self._remote = start_ray(self.cfg)
        try:
            yield
        finally:
            self._remote = None
            if started_here:
                stop_ray()

    def describe(self) -> str:
        if self.plan is None:
            return "nothing to do"
        return f"{self.plan.describe()}; object store budget {self.budget_mb} MB"

    # ------------------------------------------------------------------ plan
    def place(self, pipeline: Pipeline, res: dict[str, float], remote: bool, nodes: list[dict] | None = None,
              no_autoscaler: bool = False) -> ResourcePlan:
        """The resource plan for ``pipeline`` on a cluster with ``res`` (and ``nodes``, as ``ray.nodes()``
        lists them); places every operator's head stage. ``no_autoscaler``: the cluster cannot grow, so a GPU
        no node has now will never come."""
        model = next((s for s in pipeline.stages if s.stateful and s.role == "model"), None)
        wants_gpu = bool(model is not None and getattr(model, "wants_gpu", False))
        max_gpus = None
        if remote and res.get("GPU", 0.0) < 1:  # no GPU up: can an autoscaler start one? (None: unknown)
            max_gpus = 0.0 if no_autoscaler else cluster_max_gpus()
        live = [n.get("Resources", {}) for n in nodes or [] if n.get("Alive")]
        # the infer actors must fit a node that has their custom resources (ray.actor_resources), if any
        live = [n for n in live if all(n.get(k, 0.0) >= v for k, v in self.cfg.actor_resources.items())] or live
        plan = plan_resources(self.cfg, res.get("CPU", 0.0), res.get("GPU", 0.0), autoscaling=remote,
                              max_gpus=max_gpus, wants_gpu=wants_gpu,
                              node_host_cpus_per_gpu=node_host_cpus_per_gpu(nodes or []),
                              max_node_cpus=max((n.get("CPU", 0.0) for n in live), default=None))
        pools = plan.pools()
        for group in fuse(pipeline.stages):
            head = group[0]
            if head.stateful:
                pool = pools[pool_of(head)]
                head.place(Resources(cpus=pool["cpus"], gpus=pool["gpus"]), pool["threads"])
            else:
                head.place(Resources(cpus=plan.read_cpus))
        return plan

    def operators(self, pipeline: Pipeline, plan: ResourcePlan) -> list[dict[str, Any]]:
        """The Ray operators as the engine runs them: name, fused stages, one worker's resources, pool bounds
        (what ``labelmill run --dry-run --json`` reports)."""
        pools = plan.pools()
        out = []
        for group in fuse(pipeline.stages):
            head = group[0]
            entry: dict[str, Any] = {"name": head.name, "stages": [s.name for s in group]}
            if head.stateful:
                pool = pools[pool_of(head)]
                entry["resources"] = {"CPU": pool["cpus"], "GPU": pool["gpus"]}
                if head.role == "model" and self.cfg.actor_resources:
                    entry["resources"].update(self.cfg.actor_resources)
                entry["kind"] = "actors"
                entry["actors"] = {"min": pool["min"], "max": pool["max"]}
                entry["calls_per_actor"] = getattr(head, "concurrent_calls", 1) or (2 if pool["gpus"] else 1)
            else:
                entry["resources"] = {"CPU": plan.read_cpus, "GPU": 0.0}
                entry["kind"] = "tasks"
                entry["concurrency"] = plan.read_tasks
            out.append(entry)
        return out

    def dataset(self, pipeline: Pipeline, inputs: list[str], plan: ResourcePlan, meter=None):
        """The Ray dataset that streams ``inputs`` through ``pipeline``'s operators (what ``run`` iterates;
        benchmarks iterate it directly)."""
        import ray.data
        from ray.data import ActorPoolStrategy

        from labelmill.engine.sources import ShardDatasource

        source = pipeline.source
        ds = ray.data.read_datasource(
            ShardDatasource(source, inputs, meter), override_num_blocks=len(inputs), concurrency=plan.read_tasks,
            **source.resources().ray_args(),
        )
        pools = plan.pools()
        for group in fuse(pipeline.stages[1:]):
            head = group[0]
            kwargs: dict[str, Any] = dict(batch_format=head.batch_format, zero_copy_batch=True,
                                          **head.resources().ray_args())
            if head.stateful:
                pool = pools[pool_of(head)]
                if head.role == "model" and self.cfg.actor_resources:
                    kwargs["resources"] = dict(self.cfg.actor_resources)
                rows = self.batch_size * head.batches_per_call if head.role == "model" else None
                calls = getattr(head, "concurrent_calls", 1) or (2 if pool["gpus"] else 1)
                threads = dict(max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True) if calls > 1 else {}
                ds = ds.map_batches(
                    actor_class(group, meter), batch_size=rows,
                    compute=ActorPoolStrategy(min_size=pool["min"], max_size=pool["max"], **threads), **kwargs,
                )
            else:
                ds = ds.map_batches(_Chain(group, meter), batch_size=None, concurrency=plan.read_tasks, **kwargs)
        return ds

    def check_placeable(self, pipeline: Pipeline, nodes: list[dict], limits: dict[str, float] | None,
                        autoscaler: bool = False) -> None:
        """Refuse, before any work, a plan one of whose workers fits on no live node when no autoscaler can add
        such a node (``limits``: the most the autoscaler's node types provide, None where it does not say;
        ``autoscaler``: one runs)."""
        from labelmill.config import ConfigError

        requests = self._requests(pipeline)
        missing = unschedulable(requests, nodes)
        if autoscaler and limits is None:
            return  # an autoscaler whose node types we cannot see: the stall watch judges later
        if limits is not None:  # an autoscaler waits for nodes it can start; not for what none of its types has
            missing = {name: lacks for name, lacks in missing.items()
                       if any(limits.get(k, 0.0) < requests[name].get(k, 0.0) for k in lacks)}
        if missing:
            what = "; ".join(f"{name} workers need {{{_fmt(requests[name])}}} each, no node has {{{_fmt(lacks)}}}"
                             for name, lacks in missing.items())
            raise ConfigError(f"the resource plan fits on no node of this cluster: {what} (no autoscaler can add "
                              "one); lower ray.cpus_per_actor / ray.gpus_per_actor, or ray.actor_resources")

    def _requests(self, pipeline: Pipeline) -> dict[str, dict[str, float]]:
        """Per operator (named by its first stage): what one of its workers needs from one node."""
        out = {}
        for group in fuse(pipeline.stages):
            head = group[0]
            need = head.resources().request()
            if head.stateful and head.role == "model":
                need.update(self.cfg.actor_resources)
            out[head.name] = need
        return out

    # ------------------------------------------------------------------- run
    def run(self, pipeline: Pipeline, inputs: list[str], loop: CommitLoop) -> RunCounters:
        """Stream ``inputs`` (shard URLs) through ``pipeline``; ``loop`` commits what the writers report."""
        pipeline.check()
        if not inputs:
            return loop.finish()
        if self._remote is None:
            started_here, remote = start_ray(self.cfg)
        else:
            started_here, remote = False, self._remote
        import ray

        ledger = meter = ticker = None
        try:
            nodes = ray.nodes()
            self.plan = plan = self.place(pipeline, ray.cluster_resources(), remote, nodes)
            limits = autoscaler_limits() if remote else None
            scaler = False
            if remote and unschedulable(self._requests(pipeline), nodes):
                scaler = autoscaler_present(limits, wait_s=10.0)  # the v1 monitor reports every few seconds
                if not scaler and plan.gpus_per_actor and self.cfg.device == "auto":
                    # no GPU node and nothing that could add one: label on the CPUs there are
                    self.plan = plan = self.place(pipeline, ray.cluster_resources(), remote, nodes, no_autoscaler=True)
            self.check_placeable(pipeline, nodes, limits, scaler)
            rows = max((s.bytes_per_row() or 0) for s in pipeline.stages) or 1 << 20
            self.budget_mb = self.cfg.object_store_budget_mb or default_budget_mb(plan, self.batch_size, rows)
            configure_ray_data(plan, self.budget_mb)
            print(f"[labelmill] plan: {self.describe()}", file=self.stream)
            ledger = _ledger_class().remote()
            pipeline.source.reporter = _LedgerClient(ledger)
            meter = _meter_class().remote()
            known = 0
            last_poll = 0.0
            stages = StageTotals(shown_stages(pipeline))
            progress = Progress(self.progress_interval_s, len(inputs), self.stream, stages=stages)

            def poll() -> None:
                nonlocal known
                for shard, n, dups, failed in ray.get(ledger.since.remote(known)):
                    known += 1
                    loop.shard_read(shard, n, dups, failed)
                    progress.shard_read(n)

            def refresh() -> None:
                stages.update(ray.get(meter.get.remote()))
                progress.update(loop.counters, loop.committed)

            # the line refreshes on its own clock, also while the stream waits (model load, a slow shard)
            ticker = _Ticker(min(progress.interval, 1.0), refresh)
            # whether to wait for an autoscaler: known now, or (a cluster reached by address) asked at a stall
            waits = True if scaler or limits is not None else (None if remote else False)
            watch = StallWatch(self.cfg.stall_timeout_s, self._requests(pipeline), waits, self.stream, limits=limits)
            try:
                with watch.watching():
                    for batch in self.dataset(pipeline, inputs, plan, _MeterClient(meter)).iter_batches(
                        batch_format="pyarrow", batch_size=None, prefetch_batches=1
                    ):
                        loop.add(batch)
                        watch.progressed()
                        if time.monotonic() - last_poll > 0.5:
                            poll()
                            last_poll = time.monotonic()
            except KeyboardInterrupt:
                if watch.error is not None:
                    raise watch.error from None
                raise
            poll()
            counters = loop.finish()
            ticker.stop()
            stages.update(ray.get(meter.get.remote()))
            progress.close(loop.counters, loop.committed)
            return counters
        finally:
            if ticker is not None:
                ticker.stop()
            if meter is not None:
                ray.kill(meter)
            pipeline.source.reporter = None
            if ledger is not None:
                ray.kill(ledger)
            if started_here:
                stop_ray()
