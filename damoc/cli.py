"""`damoc` entry point: parses arguments, loads the spec, calls the pipeline. Thin on purpose."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from damoc.spec import SpecError, load_spec

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_PARTIAL = 3  # the stages ran, but some candidates failed: the ranking covers the others

log = logging.getLogger("damoc.cli")


def _print_spec_error(err: SpecError) -> None:
    for line in err.problems:
        print(f"{err.source}: {line}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.job, overrides=args.set)
    except SpecError as err:
        _print_spec_error(err)
        return EXIT_BAD_INPUT
    from damoc.preflight import candidate_problems, data_problems, hub_warnings

    problems, warnings = data_problems(spec) + candidate_problems(spec), hub_warnings(spec)
    for line in problems:
        print(f"{args.job}: {line}", file=sys.stderr)
    for line in warnings.values():
        print(f"{args.job}: warning: {line}", file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    print(f"{args.job}: ok (job '{spec.name}', {len(spec.candidates)} candidate(s), output {spec.output_dir})"
          + (f"; {len(warnings)} warning(s) above" if warnings else ""))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from damoc.plan import format_plan, project

    try:
        spec = load_spec(args.job, overrides=args.set)
    except SpecError as err:
        _print_spec_error(err)
        return EXIT_BAD_INPUT
    p = project(spec)
    print(json.dumps(p, indent=2, default=str) if args.json else format_plan(p))
    return EXIT_OK


def cmd_runtime_env(args: argparse.Namespace) -> int:
    """The runtime env to submit the job with, on stdout (jobs/submit.sh); problems on stderr, exit 2."""
    import yaml

    from damoc.cluster_env import load_base, runtime_env_for

    try:
        spec = load_spec(args.job, overrides=args.set)
        base = load_base(args.base)
    except SpecError as err:
        _print_spec_error(err)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as err:
        print(f"damoc runtime-env: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    env, problems, notes = runtime_env_for(spec, base, Path.cwd(), str(args.job))
    for line in problems:
        print(f"{args.job}: {line}", file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    for line in notes:
        print(f"{args.job}: {line}", file=sys.stderr)
    print(yaml.safe_dump(env, sort_keys=False), end="")
    return EXIT_OK


def cmd_select(args: argparse.Namespace) -> int:
    import contextlib

    from damoc.logs import QuietTerminal, log_to_file
    from damoc.pipeline import Pipeline, PipelineError, parse_stage_list

    try:
        spec = load_spec(args.job, overrides=args.set)
        stages = parse_stage_list(args.stages)
    except SpecError as err:  # everything about the spec is known before any cluster work
        _print_spec_error(err)
        return EXIT_BAD_INPUT
    except PipelineError as err:
        print(f"damoc select: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if "data" in stages:
        from damoc.preflight import data_problems

        problems = data_problems(spec)  # every row would be quarantined: say why before any cluster work
        for line in problems:
            print(f"{args.job}: {line}", file=sys.stderr)
        if problems:
            return EXIT_BAD_INPUT

    def start_ray():
        from damoc.interrupt import reclaim
        from damoc.runtime import connect

        runtime = connect(args.address, num_cpus=args.cpus)
        reclaim()  # ray.init replaced the SIGTERM handler with one that exits the process
        return runtime

    pipeline = Pipeline(spec, runtime_factory=start_ray)
    try:
        handler = log_to_file(pipeline.run_dir / "logs" / "damoc.log")
    except OSError as exc:
        print(f"damoc select: run directory {pipeline.run_dir} is not writable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    libraries = pipeline.run_dir / "logs" / "libraries.log"
    quiet = contextlib.nullcontext() if getattr(args, "verbose", False) else QuietTerminal(libraries)
    with quiet as terminal:
        if terminal is not None:
            log.info("job %s: library output (Ray, Tune, DeepSpeed, warnings) goes to %s; -v shows it here",
                     spec.name, libraries)
        code = _select(args, spec, stages, pipeline, handler, terminal)
    return code


def _select(args, spec, stages, pipeline, handler, terminal) -> int:
    from damoc.interrupt import Interrupted, interruptible
    from damoc.pipeline import PipelineError, StageFailed
    from damoc.rundir import RunLocked

    out = terminal.stdout if terminal is not None else sys.stdout
    resume = not args.fresh
    if pipeline.remote is not None:
        log.info("job %s: run directory %s, worked on in the local mirror %s", spec.name, pipeline.location,
                 pipeline.run_dir)
    log.info("job %s: stages %s -> %s (%s)", spec.name, ",".join(stages), pipeline.location,
             "stages whose inputs are unchanged are kept, an interrupted fine-tuning continues; --fresh recomputes"
             if resume else "--fresh: every stage recomputed")
    from damoc.preflight import candidate_problems

    for line in candidate_problems(spec):  # those candidates fail in their stage; the others run
        log.warning("%s: %s", args.job, line)
    try:
        with interruptible():
            outcomes = pipeline.run(stages, resume=resume)
    except (PipelineError, StageFailed, RunLocked, OSError) as err:  # OSError: full disk, lost mount
        log.error("%s", err)
        log.info("the run's log, with the traceback: %s (-v shows it here)", pipeline.run_dir / "logs" / "damoc.log")
        return EXIT_FAILED
    except Interrupted as stop:  # interruptible() has turned whatever a library made of the signal into this
        log.error("job %s: interrupted (%s); the run is not complete and nothing unfinished is marked done. "
                  "The same command continues it: finished stages and trials are kept, interrupted trials "
                  "resume from their last checkpoints", spec.name, stop.signal_name)
        return stop.exit_code
    finally:
        logging.getLogger("damoc").removeHandler(handler)
        handler.close()
    if "report" in stages:
        from damoc.report.build import ranking_table
        from damoc import records

        ranking = records.read(records.Ranking, pipeline.run_dir)
        if ranking:
            print(ranking_table(ranking), file=out)
            print(f"report: {pipeline.run_dir / 'report' / 'report.html'}", file=out)
    ran = [o for o in outcomes if o.status == "ran"]
    log.info("job %s: %d stage(s) ran, %d skipped, %.1fs; run directory %s", spec.name, len(ran),
             len(outcomes) - len(ran), sum(o.seconds for o in outcomes), pipeline.location)
    failed = failed_candidates(pipeline.run_dir, stages)
    if failed:
        log.warning("job %s: %d of %d candidate(s) failed (%s); the %s covers the others (exit %d)", spec.name,
                    len(failed), len(spec.candidates), ", ".join(failed),
                    "ranking" if "report" in stages else "output", EXIT_PARTIAL)
        return EXIT_PARTIAL
    return EXIT_OK


def failed_candidates(run_dir: Path, stages: list[str]) -> list[str]:
    """Candidates the last stage run failed (upstream failures are carried down into each stage's output)."""
    from damoc import records

    for stage, kind in (("report", records.Ranking), ("finetune", records.Results), ("models", records.ModelsIndex)):
        if stage in stages:
            data = records.read(kind, run_dir) or {}
            return [c["name"] for c in data.get("candidates", []) if c.get("status") == "failed"]
    return []


def cmd_report(args: argparse.Namespace) -> int:
    from damoc.pipeline import MARKER
    from damoc.report.build import write_report
    from damoc.rundir import new_temp_dir, swap_in_dir

    run = args.run.resolve()
    final = run / "report"
    tmp = new_temp_dir(final)
    try:
        ranking = write_report(run, tmp)
    except (FileNotFoundError, ValueError, KeyError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"damoc report: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if (final / MARKER).is_file():  # still the report stage's output for --resume
        shutil.copyfile(final / MARKER, tmp / MARKER)
    swap_in_dir(tmp, final)
    best = next((c["name"] for c in ranking["candidates"] if c["rank"] == 1), None)
    print(f"{final / 'report.html'}: {len(ranking['candidates'])} candidates, best {best}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from damoc.report.compare import compare_runs, format_comparison

    try:
        result = compare_runs(args.run_a, args.run_b)
    except (FileNotFoundError, ValueError) as err:
        print(f"damoc compare: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result, indent=2) if args.json else format_comparison(result, str(args.run_a), str(args.run_b)))
    return EXIT_OK


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from damoc.runtime import connect
    from damoc.zoo.build import PRESETS, build_zoo, is_current

    if args.preset not in PRESETS:
        print(f"damoc zoo build: unknown preset '{args.preset}'; known: {', '.join(PRESETS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.force and is_current(args.out, args.preset, args.seed):
        log.info("zoo %s: up to date (preset %s, seed %d)", args.out, args.preset, args.seed)
        return EXIT_OK
    from damoc.zoo.real import FetchError

    try:
        with connect(args.address):
            info = build_zoo(args.out, args.preset, args.seed, force=args.force)
    except FetchError as err:
        print(f"damoc zoo build: {err}", file=sys.stderr)
        return EXIT_FAILED
    for c in info["candidates"]:
        print(f"  {c['name']:<22} {c['family']:<9} {c['params']:>11,d} params  {c['steps']:>4d} steps  "
              f"loss {c['final_loss']:.3f}  ({c['mix']})")
    if (Path(args.out) / "job.yaml").is_file():
        print(f"job spec: {Path(args.out) / 'job.yaml'}")
    return EXIT_OK


def job_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand that takes a job spec, and `--set` overrides of its keys."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("job", type=Path)
    cmd.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a spec key, e.g. --set output_dir=s3://bucket/runs/x")
    cmd.set_defaults(func=func)
    return cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="damoc", description="Select the best LLM to fine-tune, cheaply.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything on the terminal: library output, debug lines, tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    job_command(sub, "validate", "check a job spec; exit 2 listing every problem", cmd_validate)
    pl = job_command(sub, "plan", "project the cost of fine-tuning every candidate in full vs DaMoC", cmd_plan)
    pl.add_argument("--json", action="store_true", help="print the projection as JSON")
    e = job_command(sub, "runtime-env", "the runtime env to `ray job submit` a job with: the base one, narrowed "
                    "so that the files its spec names are uploaded (jobs/submit.sh uses it)", cmd_runtime_env)
    e.add_argument("--base", default="cluster/runtime_env.yaml", help="the runtime env to start from")
    s = job_command(sub, "select", "run the selection job and write the run directory", cmd_select)
    s.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local cluster)")
    s.add_argument("--stages", default=None, help="comma-separated subset of data,models,finetune,report")
    s.add_argument("--cpus", type=int, default=None, help="CPUs of the embedded cluster (default: all of this machine's)")
    s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show everything on the terminal: library output, debug lines, tracebacks")
    s.add_argument("--resume", action="store_true",
                   help="keep stages whose inputs are unchanged and continue an interrupted fine-tuning (the default)")
    s.add_argument("--fresh", action="store_true", help="recompute every stage, even those whose output is current")
    run_commands(sub)
    return p


def run_commands(sub) -> None:
    """The commands that read finished runs, and the zoo."""
    r = sub.add_parser("report", help="(re)write the report of a run from its files")
    r.add_argument("run", type=Path)
    r.set_defaults(func=cmd_report)
    c = sub.add_parser("compare", help="ranking agreement and cost ratio of two runs (B is the reference)")
    c.add_argument("run_a", type=Path)
    c.add_argument("run_b", type=Path)
    c.add_argument("--json", action="store_true", help="print the figures as JSON")
    c.set_defaults(func=cmd_compare)
    z = sub.add_parser("zoo", help="local candidate models and domain sets")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="pretrain the zoo's candidates and build its domain sets")
    zb.add_argument("--out", type=Path, required=True)
    zb.add_argument("--preset", default="demo")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--force", action="store_true", help="rebuild even if up to date")
    zb.add_argument("--address", default=None, help="Ray cluster to use (default: embedded)")
    zb.set_defaults(func=cmd_zoo_build)


def main(argv: list[str] | None = None) -> int:
    from damoc.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    try:
        return args.func(args)
    finally:
        from damoc.compat import no_colour_reset_at_exit

        no_colour_reset_at_exit()


if __name__ == "__main__":
    sys.exit(main())
