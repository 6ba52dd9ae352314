"""Workarounds for library behaviour DaMoC depends on, each with the symptom it answers; when Ray or
DeepSpeed changes, this is where to look first."""

from __future__ import annotations


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
