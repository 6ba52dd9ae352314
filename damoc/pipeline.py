"""Run the stages in order over the run directory, caching each stage's output.

A stage reads only what earlier stages wrote into the run directory (plus the
external files its spec names) and writes one folder, RUN/<stage.output>/. The
folder is built under a temporary name and swapped in whole, with a marker file
`_stage.json` holding the fingerprint of everything the stage read: its spec
sections, the seed, its external files, and its upstream stages' fingerprints.
`--resume` skips a stage whose marker matches the current fingerprint and reruns
any other. A folder without a marker is never taken as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import yaml

from damoc.interrupt import interruption
from damoc.metrics import record_stage
from damoc.rundir import (
    atomic_write_json,
    atomic_write_text,
    check_writable,
    clean_leftovers,
    new_temp_dir,
    read_json,
    run_lock,
    swap_in_dir,
)
from damoc.spec import JobSpec, is_uri, resolve_path
from damoc.store import Lease, RemoteRun, is_remote, join, mirror_dir, upload_folder

log = logging.getLogger("damoc.pipeline")

MARKER = "_stage.json"
IDLE_POLL_S = 0.25  # how often a running stage's CPUs are looked at for the next stage's early start
STAGE_ORDER = ("data", "models", "finetune", "report")

# Where each built-in stage lives; a stage's module registers it on import.
BUILTIN_STAGE_MODULES = {
    "data": "damoc.data.stage",
    "models": "damoc.model.stage",
    "finetune": "damoc.train.stage",
    "report": "damoc.report.stage",
}


class PipelineError(RuntimeError):
    """A problem with what was asked of the pipeline (unknown stage, missing upstream)."""


class StageFailed(RuntimeError):
    def __init__(self, stage: str, seconds: float, cause: BaseException):
        self.stage, self.seconds, self.cause = stage, seconds, cause
        super().__init__(f"stage {stage} failed after {seconds:.1f}s: {type(cause).__name__}: {cause}")


@dataclass
class StageContext:
    """What a running stage sees: the spec, where to write, where earlier stages wrote."""

    spec: JobSpec
    run_dir: Path
    out: Path  # the temporary folder this stage writes into
    base_dir: Path
    _runtime_factory: Callable[[], Any] = field(repr=False)
    fingerprint: str = ""  # of this stage's inputs: names work a later attempt may pick up
    resume: bool = False  # continue work an interrupted attempt left (a stage that can)
    prepared: list[Any] = field(default_factory=list)  # actors started for it early (Stage.prepare)
    output: str = ""  # the stage's folder name under the run directory
    remote: RemoteRun | None = None  # the run's truth when output_dir is a URI (run_dir is then its mirror)
    uploaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # files workers put on the bucket

    def input(self, stage_output: str) -> Path:
        """An upstream stage's finished folder, e.g. ctx.input("data") / "train.parquet"."""
        return self.run_dir / stage_output

    def shared(self, rel: str) -> str:
        """An earlier stage's file or folder as every node reaches it: the run directory's path, or its
        URI on object storage (a worker reads it through damoc.store.localize)."""
        return join(self.remote.uri, rel) if self.remote else str((self.run_dir / rel).resolve())

    def worker_dir(self, sub: str) -> str:
        """Where a worker on any node writes part of this stage's output: under the temporary folder, or
        straight to the bucket, where the stage's last output then stops being complete (its marker goes
        now, and comes back once the stage is done)."""
        if self.remote is None:
            return str(self.out / sub)
        self.remote.begin(self.output)
        return join(self.remote.uri, self.output, sub)

    def resolve(self, path: str) -> str:
        """A path from the spec, resolved the way `damoc validate` checked it."""
        return resolve_path(path, self.base_dir)

    @property
    def runtime(self) -> Any:
        """The Ray runtime, started on first use (stages that need no Ray never start it)."""
        return self._runtime_factory()


class Stage:
    """Base of every stage. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    output: ClassVar[str]  # folder under the run directory
    needs: ClassVar[tuple[str, ...]] = ()  # upstream stage names
    spec_keys: ClassVar[tuple[str, ...]] = ()  # JobSpec sections the stage reads
    version: ClassVar[str] = "1"  # bump when the stage's output changes meaning
    needs_ray: ClassVar[bool] = True

    def external_inputs(self, spec: JobSpec) -> list[str]:
        """Files or folders outside the run directory that the stage reads."""
        return []

    def fingerprint_spec(self, spec: JobSpec) -> dict[str, Any]:
        """The spec sections the fingerprint covers (a stage may leave out a setting it does not use)."""
        return spec.section(*self.spec_keys)

    def fingerprint_extra(self, spec: JobSpec) -> dict[str, Any]:
        """Single settings outside the stage's spec sections that change its output."""
        return {}

    def prepare(self, spec: JobSpec, base_dir: Path) -> list[Any]:
        """Ray actors this stage starts first, started early: while the stage before it runs, once that
        stage has held every CPU of the cluster and then left one idle (its busiest part is over). They
        reach `run` as ctx.prepared, already past their start-up; the pipeline kills them if this stage
        does not run. None by default."""
        return []

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Write outputs under ctx.out; return the counts for the stage's log line."""
        raise NotImplementedError


REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"stage '{cls.name}' is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def builtin_stage(name: str) -> type[Stage]:
    """The registered built-in stage, importing its module on first use."""
    if name not in REGISTRY:
        module = BUILTIN_STAGE_MODULES[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                raise PipelineError(f"stage '{name}' is not part of this build yet ({module} is missing)") from None
            raise
    return REGISTRY[name]


FAILED_MARK = ".failed"


def failed_dir(final: Path) -> Path:
    return final.with_name(final.name + FAILED_MARK)


def keep_failed(tmp: Path, final: Path) -> Path | None:
    """A failed stage's folder, kept as RUN/<stage>.failed for its evidence (the quarantine and the
    reasons); its scratch work (`_work`) goes. The stage's last good output is untouched."""
    kept = failed_dir(final)
    shutil.rmtree(kept, ignore_errors=True)
    shutil.rmtree(tmp / "_work", ignore_errors=True)
    try:
        if not any(tmp.iterdir()):
            raise OSError("nothing written")
        tmp.rename(kept)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return kept


def release(actors: list[Any]) -> None:
    """Kill actors a stage was given but did not use (it was skipped, or the run ended)."""
    if not actors:
        return
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)


def parse_stage_list(text: str | None, known: Iterable[str] = STAGE_ORDER) -> list[str]:
    """'data,models' -> ['data', 'models'] in pipeline order; unknown names are an error."""
    known = list(known)
    if not text:
        return known
    asked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in known]
    if unknown:
        raise PipelineError(f"--stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [s for s in known if s in asked]


# ---------------------------------------------------------------- fingerprints


def path_signature(path: str, base_dir: Path) -> list[Any]:
    """Cheap identity of a file or folder: (relative path, size, mtime_ns) per file.
    URIs and hub names cannot be stat'ed offline and are fingerprinted by name."""
    if is_uri(path):
        return [path]
    full = Path(resolve_path(path, base_dir))
    if full.is_file():
        st = full.stat()
        return [[str(full), st.st_size, st.st_mtime_ns]]
    if full.is_dir():
        sig = []
        for root, dirs, files in os.walk(full):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                p = Path(root) / name
                st = p.stat()
                sig.append([str(p.relative_to(full)), st.st_size, st.st_mtime_ns])
        return [str(full), sig]
    return [str(full), "missing"]


def read_marker(run_dir: Path, stage: type[Stage] | Stage) -> dict[str, Any] | None:
    marker = read_json(run_dir / stage.output / MARKER)
    return marker if isinstance(marker, dict) and "fingerprint" in marker else None


def stage_fingerprint(stage: Stage, spec: JobSpec, run_dir: Path, base_dir: Path,
                      upstream_classes: dict[str, type[Stage]]) -> str:
    upstream = {}
    for up, cls in upstream_classes.items():
        marker = read_marker(run_dir, cls)
        upstream[up] = marker["fingerprint"] if marker else None
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "seed": spec.seed,
        "spec": stage.fingerprint_spec(spec),
        "upstream": upstream,
        "inputs": [path_signature(p, base_dir) for p in stage.external_inputs(spec)],
    }
    extra = stage.fingerprint_extra(spec)
    if extra:  # absent when empty, so fingerprints of stages without extras are unchanged
        payload["extra"] = extra
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- the runner


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float
    counts: dict[str, Any]
    fingerprint: str


def format_counts(counts: dict[str, Any]) -> str:
    parts = []
    for k, v in counts.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class Pipeline:
    """Runs the selected stages of one job over its run directory."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        base_dir: str | os.PathLike | None = None,
        registry: dict[str, type[Stage]] | None = None,
        order: Iterable[str] | None = None,
        runtime_factory: Callable[[], Any] | None = None,
    ):
        self.spec = spec
        self.base_dir = Path(base_dir or os.getcwd())
        # On object storage the stages work in a local mirror and publish each finished stage to the bucket.
        self.remote = RemoteRun(spec.output_dir) if is_remote(spec.output_dir) else None
        self.run_dir = mirror_dir(spec.output_dir) if self.remote else Path(resolve_path(spec.output_dir, self.base_dir))
        self.location = self.remote.uri if self.remote else str(self.run_dir)
        self._registry = registry
        self.order = tuple(order or (registry.keys() if registry else STAGE_ORDER))
        self._runtime_factory = runtime_factory
        self._runtime: Any = None
        self._prepared: tuple[str, list[Any]] = ("", [])  # (stage, its actors started early)

    def stage_class(self, name: str) -> type[Stage]:
        if self._registry is not None:
            return self._registry[name]
        return builtin_stage(name)

    def _upstream(self, cls: type[Stage]) -> dict[str, type[Stage]]:
        return {n: self.stage_class(n) for n in cls.needs}

    def _get_runtime(self) -> Any:
        if self._runtime is None:
            if self._runtime_factory is None:
                raise PipelineError("this pipeline was built without a Ray runtime")
            self._runtime = self._runtime_factory()
        return self._runtime

    def run(self, stages: Iterable[str] | None = None, resume: bool = False) -> list[StageOutcome]:
        names = list(stages) if stages is not None else list(self.order)
        unknown = [n for n in names if n not in self.order]
        if unknown:
            raise PipelineError(f"unknown stage(s): {', '.join(unknown)}")
        names = [n for n in self.order if n in names]
        check_writable(self.run_dir)
        with run_lock(self.run_dir), self._lease():
            self._sync_down()
            self._write_spec()
            outcomes: list[StageOutcome] = []
            try:
                for name in names:
                    outcomes.append(self._run_one(name, names, resume))
            finally:
                release(self._take_prepared(self._prepared[0]))
                if self._runtime is not None and hasattr(self._runtime, "shutdown"):
                    self._runtime.shutdown()
                    self._runtime = None
                self._upload_logs()
            return outcomes

    def _lease(self) -> contextlib.AbstractContextManager:
        """The run lock on the bucket (the local lock guards only the mirror)."""
        return Lease(self.remote.uri).held() if self.remote else contextlib.nullcontext()

    def _sync_down(self) -> None:
        """The mirror made to agree with the bucket: a stage done there is pulled (its weights stay there),
        a stage not done there is not done here either."""
        if self.remote is None:
            return
        for name in self.order:
            cls = self.stage_class(name)
            theirs, ours = self.remote.marker(cls.output), read_marker(self.run_dir, cls)
            same = theirs and ours and all(theirs.get(k) == ours.get(k) for k in ("fingerprint", "finished_at"))
            if theirs is None and ours is not None:
                shutil.rmtree(self.run_dir / cls.output, ignore_errors=True)
            elif theirs is not None and not same:
                self.remote.pull(cls.output, self.run_dir / cls.output, theirs)
                log.info("stage %s: fetched from %s (done there on %s)", name, self.remote.uri,
                         theirs.get("finished_at", "?"))

    def _ended_badly(self, name: str, exc: BaseException, seconds: float, tmp: Path, final: Path) -> None:
        """A stage that raised: failed (its partial folder kept as evidence; StageFailed raised) or
        interrupted (nothing kept, nothing marked done; the interruption raised). Returns for the caller
        to re-raise `exc` as it is."""
        stop = interruption(exc)
        if isinstance(exc, Exception) and stop is None:
            kept = keep_failed(tmp, final)
            log.error("stage %s: failed after %.1fs: %s: %s", name, seconds, type(exc).__name__, exc)
            if kept:
                log.info("stage %s: what it wrote before failing (quarantine, logs) is kept in %s", name, kept)
                self._upload_failed(kept)
            log.debug("stage %s: the traceback", name, exc_info=exc)  # the run's log; the terminal with -v
            raise StageFailed(name, seconds, exc) from exc
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("stage %s: interrupted after %.1fs (%s): not marked done", name, seconds,
                    str(stop or exc) or type(exc).__name__)
        if stop is not None and stop is not exc:
            raise stop from exc

    def _upload_failed(self, kept: Path) -> None:
        """A failed stage's evidence beside its output on the bucket too (RUN/<stage>.failed/)."""
        if self.remote is None:
            return
        try:
            upload_folder(kept, join(self.remote.uri, kept.name))
        except OSError as exc:
            log.warning("could not upload %s to %s: %s", kept.name, self.remote.uri, exc)

    def _upload_logs(self) -> None:
        if self.remote is None or not (self.run_dir / "logs").is_dir():
            return
        for path in (self.run_dir / "logs").glob("*.log"):
            try:
                self.remote.put_file(f"logs/{path.name}", path)
            except OSError as exc:  # the run's outcome stands; its log stays in the mirror
                log.warning("could not upload %s to %s: %s", path.name, self.remote.uri, exc)

    def _write_spec(self) -> None:
        text = yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False)
        atomic_write_text(self.run_dir / "spec.yaml", text)
        if self.remote is not None:
            self.remote.put_file("spec.yaml", self.run_dir / "spec.yaml")

    def _check_upstream(self, stage: Stage, selected: list[str]) -> None:
        for up, cls in self._upstream(type(stage)).items():
            if up in selected:
                continue  # it ran (or was skipped as cached) earlier in this invocation
            marker = read_marker(self.run_dir, cls)
            if marker is None:
                raise PipelineError(
                    f"stage {stage.name} needs the output of stage {up} "
                    f"({self.run_dir / cls.output}); add '{up}' to --stages"
                )
            current = stage_fingerprint(cls(), self.spec, self.run_dir, self.base_dir, self._upstream(cls))
            if current != marker["fingerprint"]:
                log.warning("stage %s: output of %s is stale (its inputs changed since it ran); "
                            "rerun with --stages %s,%s", stage.name, up, up, stage.name)

    def _take_prepared(self, name: str) -> list[Any]:
        stage, actors = self._prepared
        if stage != name:
            return []
        self._prepared = ("", [])
        return actors

    def _prepare_next_when_idle(self, name: str, selected: list[str]) -> Callable[[], None]:
        """While stage `name` runs, a thread watches the cluster's CPUs: once the stage has held them all
        (less than one free) and then leaves one free, the next stage's `prepare` starts its actors. On a
        cluster the stage never fills that moment does not come, and nothing starts early. Returns what
        stops the watch when the stage ends."""
        later = selected[selected.index(name) + 1:]
        nxt = self.stage_class(later[0])() if later else None
        if nxt is None or type(nxt).prepare is Stage.prepare:
            return lambda: None
        stop = threading.Event()

        def watch() -> None:
            import ray

            full = False
            while not stop.wait(IDLE_POLL_S):
                if self._runtime is None:  # the stage has not started Ray yet
                    continue
                free = ray.available_resources().get("CPU", 0.0)
                if full and free >= 1:
                    try:
                        self._prepared = (later[0], nxt.prepare(self.spec, self.base_dir))
                    except Exception as exc:  # noqa: BLE001 - an early start is an optimisation only
                        log.debug("stage %s: could not start early: %s", later[0], exc)
                    else:
                        log.debug("stage %s: %d actors started while stage %s runs", later[0],
                                  len(self._prepared[1]), name)
                    return
                full = full or free < 1

        thread = threading.Thread(target=watch, name=f"damoc-prepare-{later[0]}", daemon=True)
        thread.start()

        def end() -> None:
            stop.set()
            thread.join()

        return end

    def _run_one(self, name: str, selected: list[str], resume: bool) -> StageOutcome:
        cls = self.stage_class(name)
        stage = cls()
        self._check_upstream(stage, selected)
        final = self.run_dir / cls.output
        fp = stage_fingerprint(stage, self.spec, self.run_dir, self.base_dir, self._upstream(cls))
        marker = read_marker(self.run_dir, cls)
        prepared = self._take_prepared(name)
        if resume and marker is not None and marker["fingerprint"] == fp:
            release(prepared)
            log.info("stage %s: skipped, output is current (fingerprint %s, ran %.1fs on %s)",
                     name, fp, marker.get("seconds", 0.0), marker.get("finished_at", "?"))
            return StageOutcome(name, "skipped", 0.0, marker.get("counts", {}), fp)
        if resume and marker is not None:
            log.info("stage %s: inputs changed (fingerprint %s -> %s), rerunning", name, marker["fingerprint"], fp)
        if clean_leftovers(final):
            log.info("stage %s: removed leftovers of an interrupted run", name)

        log.info("stage %s: running", name)
        tmp = new_temp_dir(final)
        ctx = StageContext(self.spec, self.run_dir, tmp, self.base_dir, self._get_runtime, fp, resume, prepared,
                           cls.output, self.remote)
        t0 = time.monotonic()
        stop_watching = self._prepare_next_when_idle(name, selected)
        try:  # the marker and the swap are inside: a full disk there leaves nothing half-done
            try:
                counts = stage.run(ctx) or {}
            finally:
                stop_watching()
            seconds = time.monotonic() - t0
            atomic_write_json(tmp / MARKER, {
                "stage": name,
                "fingerprint": fp,
                "seconds": round(seconds, 3),
                "counts": counts,
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            if self.remote is not None:  # the bucket first: the mirror never claims what the bucket lacks
                self.remote.publish(cls.output, tmp, ctx.uploaded)
            swap_in_dir(tmp, final)
        except BaseException as exc:
            self._ended_badly(name, exc, time.monotonic() - t0, tmp, final)
            raise
        shutil.rmtree(failed_dir(final), ignore_errors=True)  # superseded by this success
        log.info("stage %s: done in %.1fs %s", name, seconds, format_counts(counts))
        record_stage(self.spec.name, name, seconds)
        return StageOutcome(name, "ran", seconds, counts, fp)
