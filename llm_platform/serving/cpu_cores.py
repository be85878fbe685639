"""On a CPU node, the cores vLLM gives its workers are theirs alone: the node's serving processes run on the rest.

vLLM's CPU backend binds each worker's OpenMP threads to cores of their own and leaves the others (one per
worker by default, its "reserved" cores) to the processes around it: its engine core (the scheduler) and its
API server. Under Ray Serve there are more of them: Serve's controller and proxy, the ingress, the model
replicas. Free to run anywhere, they land on the workers' cores as well, and every slice they take there stalls
a forward pass. On 2 cores (tiny-l, 32 clients, 3 x 64 requests of 64 tokens, `llmp serve` alone on the
machine), the load took 21.5-24.0 s in four runs with those processes kept on the reserved core and 29.0-29.6 s
without; vLLM's own server took 21.1 s.

Neither Ray nor vLLM places processes other than vLLM's workers, so this module does, and only that: once a
replica's engine is up, every Serve process and every vLLM engine-core process of this Ray node (the processes
carrying this raylet's pid, as Ray's workers do) is given the cores no vLLM worker of the node is bound to.
Training workers and other Ray tasks are left alone, and so are Ray's own daemons, whose children must keep the
whole node; except on the cluster `llmp serve` starts for itself, where every process but vLLM's workers moves
(the launcher does that once the application is up). Where vLLM binds nothing (GPUs,
``VLLM_CPU_OMP_THREADS_BIND=nobind``), or its workers hold every core, nothing changes.
"""

from __future__ import annotations

import logging
import os

import psutil

logger = logging.getLogger(__name__)

REPLICA_TITLE = "ray::ServeReplica:"
SERVE_TITLES = ("ray::ServeController", "ray::ProxyActor", REPLICA_TITLE)
ENGINE_TITLE, WORKER_TITLE = "VLLM::EngineCore", "VLLM::Worker"
SPAWNED = "from multiprocessing.spawn import spawn_main"
NODE_CPUS_ENV = "LLMP_NODE_CPUS"  # set by a launcher whose own cluster's daemons may be narrowed
CLUSTER_ENV = "LLMP_SERVING_CLUSTER"  # the launcher's pid, in the environment of every process of its cluster


def record_node_cpus() -> None:
    """Before starting a cluster whose every process may be moved (see the module's text): the cores it may
    use, for the processes that start later (they inherit the daemons' narrowed cores, and widen back to these),
    and a mark every process of the cluster inherits (:func:`own_cluster`)."""
    os.environ[NODE_CPUS_ENV] = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
    os.environ[CLUSTER_ENV] = str(os.getpid())


def own_cluster() -> list[psutil.Process]:
    """Every process of the cluster this process started after :func:`record_node_cpus`, itself included:
    its descendants, and those carrying the mark elsewhere in the process tree (this one's /proc environment is
    the one it started with, and some of Ray's processes start with an environment of their own)."""
    me = psutil.Process()
    found = {proc.pid: proc for proc in [me, *me.children(recursive=True), *marked(CLUSTER_ENV, str(me.pid))]}
    return list(found.values())


def node_cpus() -> set[int] | None:
    """The cores this Ray node may use: as recorded by :func:`record_node_cpus`, else its raylet's (never
    narrowed then); None outside a Ray worker."""
    if os.environ.get(NODE_CPUS_ENV):
        return {int(cpu) for cpu in os.environ[NODE_CPUS_ENV].split(",")}
    raylet = os.environ.get("RAY_RAYLET_PID")
    try:
        return set(psutil.Process(int(raylet)).cpu_affinity()) if raylet else None
    except (psutil.Error, ValueError):
        return None


def widen_this_thread() -> None:
    """Before an engine starts: this thread (whose mask vLLM's processes inherit) may use the node's cores again,
    in case another replica's :func:`keep_serving_off_engine_cores` narrowed this process meanwhile."""
    cpus = node_cpus()
    if cpus:
        os.sched_setaffinity(0, cpus)


def _title(proc: psutil.Process) -> str:
    return " ".join(proc.cmdline())


def vllm_role(proc: psutil.Process) -> str | None:
    """``"engine"`` for a vLLM engine-core process that a Serve replica started, ``"worker"`` for one of its
    workers, else None.

    vLLM titles them (``VLLM::EngineCore``, ``VLLM::Worker``) with setproctitle, which fails in some processes:
    where an environment variable set before the title replaced the first string of the process's environment,
    setproctitle cannot find the command line's memory ("couldn't find argv from environ", with ``SPT_DEBUG=1``),
    and the process keeps multiprocessing's command line. Which processes it hits changes from run to run: in one
    test server of three, one model's engine core and worker. Where the title is missing,
    the process tree decides: an engine core is what a replica spawned, a worker what an engine core spawned.
    None as well for a process gone meanwhile."""
    try:
        return _vllm_role(proc)
    except psutil.Error:
        return None


def _vllm_role(proc: psutil.Process) -> str | None:
    title = _title(proc)
    # Where setproctitle can set only the kernel's name, that name is cut to 15 characters (VLLM::EngineCor).
    names = (title, proc.name())
    if any(name.startswith(ENGINE_TITLE[:15]) for name in names):
        return "engine"
    if any(name.startswith(WORKER_TITLE) for name in names):
        return "worker"
    if SPAWNED not in title:
        return None
    parent = proc.parent()
    if parent is None:
        return None
    if _title(parent).startswith(REPLICA_TITLE):
        return "engine"
    return "worker" if _vllm_role(parent) == "engine" else None


def marked(variable: str, value: str) -> list[psutil.Process]:
    """The processes whose environment sets ``variable`` to ``value`` (those of other users are skipped)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(variable) == value:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _node_processes() -> list[psutil.Process]:
    return marked("RAY_RAYLET_PID", os.environ["RAY_RAYLET_PID"])


def process_cores(proc: psutil.Process) -> set[int]:
    """The cores any thread of ``proc`` may run on (none for a process gone meanwhile)."""
    try:
        return set().union(*(os.sched_getaffinity(thread.id) for thread in proc.threads()))
    except (psutil.Error, OSError):
        return set()


def keep_serving_off_engine_cores(cluster: list[psutil.Process] | None = None) -> dict[str, set[int]]:
    """Moves this node's serving processes off the cores its vLLM workers are bound to (see the module's text):
    those of ``cluster`` (every process of a cluster started for serving alone) when given, else the Serve and
    engine-core processes of this Ray node. Returns what it decided: ``engine`` (the workers' cores) and
    ``serving`` (the cores left to the others; empty when nothing was moved)."""
    if cluster is None and not os.environ.get("RAY_RAYLET_PID"):
        return {"engine": set(), "serving": set()}
    engine: set[int] = set()
    serving: list[psutil.Process] = []
    for proc in _node_processes() if cluster is None else cluster:
        try:
            role = vllm_role(proc)
            if role == "worker":
                engine |= process_cores(proc)
            elif cluster is not None or role == "engine" or _title(proc).startswith(SERVE_TITLES):
                serving.append(proc)
        except (psutil.Error, OSError):
            continue
    rest = (node_cpus() or set(os.sched_getaffinity(0))) - engine
    if not engine or not rest:
        return {"engine": engine, "serving": set()}
    for proc in serving:
        try:
            for thread in proc.threads():
                os.sched_setaffinity(thread.id, rest)
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to move
            continue
    logger.info("vLLM's CPU workers hold cores %s; %d serving processes of this node run on %s",
                sorted(engine), len(serving), sorted(rest))
    return {"engine": engine, "serving": rest}
