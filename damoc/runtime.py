"""Connect to a Ray cluster, or start the embedded local one.

Rules that matter on a shared host:
- With an address (`--address` or RAY_ADDRESS) we only connect; `shutdown` then
  disconnects and leaves that cluster running.
- Without one we start a *new* local instance (`address="local"`), never attach to
  somebody's `ray start` instance by accident, and at exit stop only the processes
  we started (`ray.shutdown()`); a bare `ray stop` would kill everyone's.
- The embedded dashboard (and with it the State and Jobs APIs) binds to 127.0.0.1.
  Ray >= 2.52 turns token auth on for local clusters: clients such as
  `ray job submit` must run with RAY_AUTH_MODE=token to send the token Ray saved
  in ~/.ray/auth_token, which we make readable by its owner only.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from damoc.compat import agent_port_override, write_ray_address

log = logging.getLogger("damoc.runtime")

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


@dataclass
class Runtime:
    """A live connection to a Ray cluster; `embedded` when this process started it."""

    address: str
    dashboard_url: str | None
    embedded: bool
    temp_dir: str | None = None  # the embedded cluster's private Ray temp dir
    _saved_env: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def job_submit_hint(self) -> str:
        if not self.dashboard_url:
            return ""
        auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
        return f"{auth}ray job submit --address http://{self.dashboard_url} -- <command>"

    def shutdown(self) -> None:
        """Disconnect; stops the cluster only if this process started it."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _restore_env(self._saved_env)
        self._saved_env.clear()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        log.info("ray: %s", "embedded cluster stopped" if self.embedded else "disconnected")

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def fitting(cluster: dict[str, float], each: dict[str, float]) -> int:
    """How many units asking for `each` (resource -> amount) fit at once in `cluster`'s resources."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in each.items() if v > 0]
    return min(fits) if fits else 1


def target_address(address: str | None) -> str | None:
    """The cluster to join: the explicit address, else RAY_ADDRESS, else None (embedded)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def unreachable(address: str, exc: BaseException) -> str:
    """What to say when a cluster cannot be joined: Ray's own message names neither token authentication
    (Ray >= 2.52 clusters started with `ray start` refuse clients without the cluster's token) nor a fix."""
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    token = os.environ.get("RAY_AUTH_TOKEN") or DEFAULT_TOKEN_PATH.is_file()
    if os.environ.get("RAY_AUTH_MODE") == "token" and token:
        auth = ("this client sends the token in RAY_AUTH_TOKEN or ~/.ray/auth_token: check that it is the cluster's "
                "(the head node's ~/.ray/auth_token)")
    else:
        auth = ("if the cluster uses token authentication (Ray >= 2.52 clusters started with `ray start` do), run "
                "with RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    return (f"could not join the Ray cluster at {address} ({cause}): {auth}; otherwise check the address and that "
            "the cluster is up")


def _protect_token_file(path: Path = DEFAULT_TOKEN_PATH) -> None:
    # Ray writes the token world-readable; it is a secret that lets anyone on the host submit jobs.
    try:
        if path.is_file() and path.stat().st_uid == os.getuid():
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                path.chmod(0o600)
    except OSError as exc:  # read-only home, etc.: worth a warning, not a failure
        log.warning("could not restrict %s: %s", path, exc)


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    include_dashboard: bool = True,
    log_to_driver: bool = True,
) -> Runtime:
    """Join the cluster at `address`/RAY_ADDRESS, or start an embedded local one."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; call Runtime.shutdown() first")
    target = target_address(address)
    if target:
        return join_cluster(target, log_to_driver)
    return start_embedded(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory,
                          include_dashboard=include_dashboard, log_to_driver=log_to_driver)


def join_cluster(target: str, log_to_driver: bool) -> Runtime:
    """Join a running cluster (never stopped by us)."""
    import ray

    from damoc.compat import send_token_if_at_hand

    t0 = time.monotonic()
    try:
        ctx = ray.init(address=target, log_to_driver=log_to_driver)
    except ConnectionError as exc:
        # Token authentication is not the default of a client: with RAY_AUTH_MODE unset and a token at hand,
        # try once more with it (a client sending a token to a cluster without authentication has its
        # actors fail, so it is never sent first).
        if os.environ.get("RAY_AUTH_MODE") or not send_token_if_at_hand():
            raise ConnectionError(unreachable(target, exc)) from exc
        ray.shutdown()
        try:
            ctx = ray.init(address=target, log_to_driver=log_to_driver)
        except ConnectionError as again:
            raise ConnectionError(unreachable(target, again)) from again
        log.info("ray: joined with the token at hand (~/.ray/auth_token or RAY_AUTH_TOKEN); RAY_AUTH_MODE=token "
                 "skips the first try without it")
    rt = Runtime(address=ctx.address_info["address"], dashboard_url=ctx.dashboard_url, embedded=False)
    log.info("ray: connected to %s in %.1fs", rt.address, time.monotonic() - t0)
    return rt


def start_embedded(*, num_cpus: int | None, num_gpus: int | None, object_store_memory: int | None,
                   include_dashboard: bool, log_to_driver: bool) -> Runtime:
    """A local cluster of our own, its dashboard on 127.0.0.1, stopped (only it) by Runtime.shutdown."""
    import ray

    t0 = time.monotonic()
    # A private temp dir (short: Ray's unix sockets live under it). Ray's job supervisor finds
    # its own cluster through `ray_current_cluster` in the node's temp dir and, without one,
    # falls back to *any* Ray instance on the host, so jobs submitted to us could run on
    # somebody else's cluster. Recording our address there misdirects nobody else.
    temp_dir = tempfile.mkdtemp(prefix="damoc-ray-", dir="/tmp")
    # Processes the cluster starts inherit the environment of this moment. Ray Train's
    # placement-group cleaner finds the State API through RAY_API_SERVER_ADDRESS, and without
    # it searches the host and fails when a second Ray instance runs there; the dashboard port
    # is chosen here so that the variable can be set before the cluster starts.
    saved = {"RAY_API_SERVER_ADDRESS": os.environ.get("RAY_API_SERVER_ADDRESS")}
    dashboard_port = _free_port()
    if include_dashboard:
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    try:
        with agent_port_override(_free_port()):
            ctx = ray.init(address="local",  # a new instance, even if another one runs on this host
                           num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_memory,
                           include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
                           dashboard_port=dashboard_port, log_to_driver=log_to_driver, _temp_dir=temp_dir)
    except BaseException:
        _restore_env(saved)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    rt = Runtime(address=ctx.address_info["address"], dashboard_url=ctx.dashboard_url or None, embedded=True,
                 temp_dir=temp_dir, _saved_env=saved)
    write_ray_address(rt.address, temp_dir)
    # Stages launched from this driver (Tune trials build their own trainers) must find
    # this cluster, not another one on the host.
    rt._saved_env["RAY_ADDRESS"] = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = rt.address
    _protect_token_file()
    log.info("ray: embedded cluster at %s, dashboard http://%s, started in %.1fs", rt.address, rt.dashboard_url,
             time.monotonic() - t0)
    if rt.job_submit_hint:
        log.info("ray: submit to it with: %s", rt.job_submit_hint)
    return rt


HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


def on_head_node():
    """A scheduling strategy for the small actors a stage's work talks to (the rung barrier, the data stage's
    tally): the head node, which lives as long as the cluster; a worker node lost with one of them on it
    would take every caller along. Not soft: Ray's scheduler treats a soft affinity as a mere preference
    and spreads such actors over the workers anyway. None (any node) where there is no head to find."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {})),
                None)
    return NodeAffinitySchedulingStrategy(head, soft=False) if head else None
