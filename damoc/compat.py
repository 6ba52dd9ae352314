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
