"""Every use of a private Ray / Tune / DeepSpeed / torch API, in one place: each workaround says the symptom
it answers, and PRIVATE_NAMES lists the private names it relies on with the versions they were checked
against. tests/test_compat.py imports each name and checks its shape, so an upgrade that moves one fails
there, naming the workaround, rather than somewhere in a sweep. No other module names `ray._private`, a
leading-underscore attribute of these libraries, or patches one of their classes (tests/test_layout.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Iterator
from typing import Any

CHECKED = {"ray": "2.60.0", "deepspeed": "0.19.8", "torch": "2.13.0"}

# (workaround, module, attribute path, what it must be): what tests/test_compat.py checks exists.
PRIVATE_NAMES = [
    ("tune_survives_oom_kills", "ray.air.execution._internal.actor_manager", "RayActorManager._actor_task_failed",
     "function"),
    ("actor_node", "ray._private.state", "actors", "function"),
    ("send_token_if_at_hand", "ray._private.authentication.authentication_token_setup",
     "maybe_enable_token_auth_if_token_available", "function"),
    ("agent_port_override", "ray._private.parameter", "RayParams.__init__(dashboard_agent_listen_port)", "parameter"),
    ("write_ray_address", "ray._private.utils", "write_ray_address", "function"),
    ("asha_rung_records", "ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler._brackets", "attribute"),
    ("asha_rung_records", "ray.tune.schedulers.async_hyperband", "_Bracket._rungs", "attribute"),
    ("forget_destroyed_groups", "deepspeed.utils.groups", "_release_process_group_references", "function"),
    ("skip_shm_comm_build", "deepspeed.ops", "__compatible_ops__", "dict"),
    ("import_muon_uncompiled", "deepspeed.runtime.zero.muon.muon_optimizer", "", "module"),
    ("import_muon_uncompiled", "torch.compiler", "set_default_backend", "function"),
]


def tune_survives_oom_kills() -> None:
    """Ray's memory monitor kills a worker with `ray.exceptions.OutOfMemoryError`, which is not a
    RayActorError; Tune's actor manager (ray.air.execution) raises "Caught unexpected exception" on
    anything else, and the whole sweep fails for one candidate that ran out of memory. Here a trial
    actor killed for memory is a dead actor: its trial fails (or retries) and the others go on."""
    from ray.air.execution._internal import actor_manager
    from ray.exceptions import OutOfMemoryError, RayActorError

    manager = actor_manager.RayActorManager
    handle = manager._actor_task_failed
    if getattr(handle, "damoc_oom", False):
        return

    def handle_oom_as_actor_death(self, tracked_actor_task, exception):
        if isinstance(exception, OutOfMemoryError):
            exception = RayActorError(error_msg=f"OutOfMemoryError: {exception}")
        return handle(self, tracked_actor_task, exception)

    handle_oom_as_actor_death.damoc_oom = True
    manager._actor_task_failed = handle_oom_as_actor_death


def actor_node(actor_id: str) -> str | None:
    """The node an actor ran on, from the GCS's actor table (Ray's public state API needs the dashboard, which a
    cluster may not run): names the node a lost trial was on before it ever reported. None if unknown."""
    try:
        from ray._private import state

        return state.actors(actor_id=actor_id)["Address"]["NodeID"] or None
    except Exception:  # noqa: BLE001 - a name for a log line only
        return None


def send_token_if_at_hand() -> bool:
    """Token authentication for a client joining a cluster, when a token is at hand (RAY_AUTH_TOKEN, or
    ~/.ray/auth_token) and RAY_AUTH_MODE is unset: clusters started with `ray start` (Ray >= 2.52) refuse
    clients without it after ~20 s of retries, saying only "failed to connect". `ray.init(address=...)` does
    not do this by itself, and setting the variable once Ray is imported is not enough (its config is
    cached): Ray's own helper refreshes it. True if on."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray: the user sets RAY_AUTH_MODE themselves
        import os

        return os.environ.get("RAY_AUTH_MODE") == "token"
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def no_colour_reset_at_exit() -> None:
    """Ray's CLI logger calls `colorama.init(strip=False)` when it is imported, and colorama then writes a
    colour reset (ESC[0m) to stdout at exit whenever stdout is a terminal: a stray `ESC[0m` after the
    job's last line in a terminal recording or a pty-backed CI log. DaMoC prints no colour, so there is
    nothing to reset: the exit hook is taken off (Ray's vendored colorama is imported as `colorama`)."""
    import atexit
    import sys

    for name in ("colorama.initialise", "ray.thirdparty_files.colorama.initialise"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "reset_all"):
            atexit.unregister(module.reset_all)


@contextlib.contextmanager
def agent_port_override(port: int) -> Iterator[None]:
    """ray.init() gives the node's dashboard agent the fixed port 52365 and has no knob for it. With another
    Ray instance on the host that port is taken and our job agent never comes up (`ray job submit` then
    fails with "No available agent"). Give it a free port instead, for the duration of ray.init."""
    from ray._private import parameter

    original = parameter.RayParams.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def write_ray_address(address: str, temp_dir: str) -> None:
    """Record the embedded cluster's address where `ray` CLI commands on this host look for it (Ray does
    this for `ray start`, not for ray.init)."""
    from ray._private.utils import write_ray_address as write

    write(address, temp_dir)


def asha_rung_records(scheduler: Any) -> list[dict[str, dict[str, float]]]:
    """ASHA's recorded results per bracket and rung milestone ({trial id: value}): Tune restores trials,
    not the scheduler, so a resumed sweep puts them back (load_asha_rung_records)."""
    return [{str(m): dict(rec) for m, rec in b._rungs} for b in scheduler._brackets]


def load_asha_rung_records(scheduler: Any, saved: list[dict[str, dict[str, float]]]) -> None:
    for bracket, rungs in zip(scheduler._brackets, saved):
        for milestone, recorded in bracket._rungs:
            recorded.update(rungs.get(str(milestone), {}))


def forget_destroyed_groups() -> None:
    """Train's local controller ends a finished trial with torch's destroy_process_group, not
    DeepSpeed's, so DeepSpeed still caches groups of the destroyed one and the next trial in this
    (reused) process fails in deepspeed.initialize ("Group ... is not registered"). Drop them."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(None)
        return
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):  # older DeepSpeed: plain module globals
            setattr(groups, name, None)


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce with the machine's C++ compiler
    when its communication backend starts: 25-30 s on 2 cores, paid again on every new machine, pod or
    virtual environment (cached in ~/.cache/torch_extensions). Only its inference all-reduce uses it;
    training reduces through torch.distributed either way. Marked unavailable, it is not built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> None:
    """deepspeed.initialize imports DeepSpeed's Muon optimizer (to check ours against ZeRO's list), and
    that module wraps its kernels in torch.compile when imported: with torch's default backend that
    imports the inductor compiler, 0.6-1 s of every trial process's start. DaMoC never steps Muon, so
    it is imported with the eager backend, whose wrappers cost nothing; the default is put back."""
    import torch.compiler

    if MUON in sys.modules or not hasattr(torch.compiler, "set_default_backend"):
        return
    before = torch.compiler.get_default_backend()
    torch.compiler.set_default_backend("eager")
    try:
        importlib.import_module(MUON)
    except ImportError:  # a DeepSpeed without Muon: nothing to spare
        pass
    finally:
        torch.compiler.set_default_backend(before)


def private_name_problems() -> list[str]:
    """One line per private name in PRIVATE_NAMES that is gone or changed shape, naming its workaround."""
    import inspect

    problems = []
    for workaround, module_name, path, kind in PRIVATE_NAMES:
        where = f"{module_name}.{path}".rstrip(".")
        try:
            obj = importlib.import_module(module_name)
            attr_path, _, param = path.partition("(")
            *owners, last = attr_path.split(".") if attr_path else [""]
            for part in owners:
                obj = getattr(obj, part)
            if kind == "attribute":  # set on instances: the class's source assigns it
                if last not in vars(obj) and f"self.{last}" not in inspect.getsource(obj):
                    raise AttributeError(last)
            elif last:
                obj = getattr(obj, last)
            if kind == "function" and not callable(obj) or kind == "dict" and not isinstance(obj, dict):
                raise TypeError(f"is a {type(obj).__name__}, not a {kind}")
            if kind == "parameter" and param.rstrip(")") not in inspect.signature(obj).parameters:
                raise TypeError(f"takes no {param.rstrip(')')}")
        except Exception as exc:  # noqa: BLE001 - each is reported, by name
            problems.append(f"compat.{workaround}: {where} is gone or changed ({type(exc).__name__}: {exc}); "
                            f"checked against {CHECKED}")
    return problems
