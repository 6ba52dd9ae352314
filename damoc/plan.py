"""`damoc plan`: before anything is spent, what fine-tuning every candidate in full would cost against
DaMoC, on the job's own resources.

Per candidate: parameters from its config.json (shapes only, no weights; a hub candidate's config is
read when the hub is reachable, else `params:` from the spec), training tokens from a sample of the
data, planned steps. Costs are projected from training FLOPs (6 x forward parameters x tokens, as the
report counts them) at a stated throughput, plus fixed costs measured on this project's runs. Every
assumption is printed with the figures. After a run the report puts the measured cost beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from damoc.lm.figures import CandidateFigures, candidate_figures, config_params
from damoc.lm.memory import length_bound
from damoc.report.savings import cost_words
from damoc.schedule import planned_steps, report_steps, resolve_grace, row_budget, rows_per_step, rungs_for, scheduler
from damoc.spec import DataSource, JobSpec, is_uri, resolve_path

# Stated throughputs (FLOP/s per worker) and fixed costs; the report replaces them with the run's own
# measurements. CPU figures are one thread per CPU in fp32, measured on this project's runs on a 2-core
# x86 machine (bench/results/cpu_floor.md, real_selection.md, cost.md): in the finetune stage
# SmolLM2-135M and Gemma 3 270M train at 66-74 GFLOP/s, and forward passes run at ~110; small models run
# at a fraction of that, their time going to per-operation overhead (the bench zoo's 0.24-1.15M-parameter
# models train at 7.5-17 GFLOP/s in the stage): a model of SMALL_PARAMS parameters runs at half the rate.
GPU_FLOPS = 100e12  # bf16 at ~40% of an A100's peak; an H100 does ~2x
CPU_TRAIN_FLOPS = 75e9
CPU_FORWARD_FLOPS = 110e9
SMALL_PARAMS = 3e6
# Start-up per trial (the timeline's fixed phases, 2-core CPU). In local mode a trial process is reused by
# the next trial: the first LOCAL_SLOTS trials pay the process start, later ones LOCAL_REUSED_S.
TRIAL_FIXED_S = {"local": 8.0, "workers": 30.0}
LOCAL_SLOTS, LOCAL_REUSED_S = 2, 1.0
DATA_FIXED_S = 8.0  # the data stage's start-up: cluster actors, the reference LM's load
DATA_ROW_S = 0.008  # the data stage's per-row work besides the reference LM (reads, rules, dedup, writes)
MODEL_FIXED_S = 1.0  # a model-stage actor's start-up, plus its weights read at LOAD_BYTES_PER_S
LOAD_BYTES_PER_S = 100e6
SAMPLE_ROWS = 256
DEFAULT_TOKENS_PER_ROW = 150  # when the data cannot be read here
DEFAULT_PROMPT_SHARE = 0.6
EXACT_ROWS = 200_000  # rows read in full to count the readable ones as the data stage will


@dataclass
class DataFigures:
    rows: int | None
    tokens_per_row: float
    prompt_share: float
    source: str  # sampled | spec | assumed
    notes: list[str] = field(default_factory=list)
    length: int | None = None  # the training sequences' length bound (damoc.lm.memory.length_bound)
    # Each local candidate's [tokens per row, prompt share] with its own tokenizer (tokenizers differ:
    # Gemma's 262k vocabulary reads the same rows in ~25% fewer tokens than SmolLM2's 49k).
    by_candidate: dict[str, list[float]] = field(default_factory=dict)

    def tokens(self, name: str) -> tuple[float, float]:
        """Tokens per row and prompt share for candidate `name` (the sample's figures where it has none)."""
        per_row, share = self.by_candidate.get(name, (self.tokens_per_row, self.prompt_share))
        return per_row, share


def count_rows(source: DataSource, base_dir: str) -> int:
    """Rows of a local source without parsing its records (lines, Parquet metadata, JSON items)."""
    from damoc.data.readers import source_files

    n = 0
    for path, fmt in source_files(source, base_dir):
        if fmt == "parquet":
            import pyarrow.parquet as pq

            n += pq.ParquetFile(path).metadata.num_rows
        elif fmt == "json":
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            n += len(data.get("data", []) if isinstance(data, dict) else data)
        else:
            with open(path, "rb") as fh:
                n += sum(1 for line in fh if line.strip()) - (1 if fmt == "csv" else 0)
    return n


def token_figures(spec: JobSpec, sample: list[dict], tokenizer_path: str) -> tuple[float, float]:
    """Tokens per row (prompt + answer as training renders them, within max_length) and the prompt's share."""
    from damoc.data.lm import count_tokens
    from damoc.lm.load import load_tokenizer
    from damoc.lm.prompts import prompt_text

    d = spec.data
    tok = load_tokenizer(tokenizer_path)
    prompts = count_tokens(tok, [prompt_text(d.task, r["instruction"], r["input"], tok, spec.finetune.template)
                                 for r in sample])
    answers = count_tokens(tok, [r["output"] for r in sample])
    per_row = min(spec.finetune.max_length, (sum(prompts) + sum(answers)) / len(sample) + 1)
    return per_row, sum(prompts) / max(1, sum(prompts) + sum(answers))


def readable_rows(spec: JobSpec, base_dir: str, rows: int) -> tuple[int, str | None]:
    """Training rows the data stage will count as readable, keep_ratio's base: the rows read as the stage
    reads them, less the quarantined ones and the held-out eval split (drawn by the same seeded hash of
    each row's content). Past EXACT_ROWS rows the count is extrapolated (with a note saying so)."""
    from damoc.data.lm import row_key, unit_hash
    from damoc.data.readers import plan_units, read_unit

    d, ratio = spec.data, spec.data.eval.split_ratio
    seen = readable = 0
    for unit in plan_units(d.train, base_dir):
        for r in read_unit(unit, d.fields):
            seen += 1
            held = ratio and unit_hash(spec.seed, "eval", row_key(r["instruction"], r["input"], r["output"])) < ratio
            readable += r.get("reason") is None and not held
        if seen >= EXACT_ROWS:
            break
    if not seen or seen >= rows:
        return readable, None
    return round(readable * rows / seen), f"readable rows extrapolated from the first {seen:,d} of {rows:,d}"


def data_figures(spec: JobSpec, base_dir: str, tokenizer_path: str | None,
                 candidate_paths: dict[str, str] | None = None) -> DataFigures:
    """Rows and tokens per row (prompt + answer as training renders them) from a sample of the data, with
    `tokenizer_path`'s tokenizer, and with each of `candidate_paths`' own (by_candidate)."""
    d = spec.data
    if d.train.hf or is_uri(d.train.path or ""):
        rows = d.train.rows
        return DataFigures(rows, DEFAULT_TOKENS_PER_ROW, DEFAULT_PROMPT_SHARE, "assumed",
                           [f"data.train {d.train.hf or d.train.path} is not read here; rows "
                            + (f"from data.train.rows ({rows:,d})" if rows else "unknown: set data.train.rows")
                            + f", {DEFAULT_TOKENS_PER_ROW} tokens per row and a {DEFAULT_PROMPT_SHARE:.0%} "
                              "prompt share assumed"])
    from damoc.data.readers import plan_units, read_unit

    rows = count_rows(d.train, base_dir)
    sample: list[dict] = []
    for unit in plan_units(d.train, base_dir):
        sample += [r for r in read_unit(unit, d.fields) if r.get("reason") is None]
        if len(sample) >= SAMPLE_ROWS:
            break
    sample = sample[:SAMPLE_ROWS]
    if not sample or tokenizer_path is None:
        return DataFigures(rows, DEFAULT_TOKENS_PER_ROW, DEFAULT_PROMPT_SHARE, "assumed",
                           ["no readable row or tokenizer for a sample; tokens per row assumed"],
                           length_bound(sample, spec.finetune.max_length) if sample else None)
    per_row, share = token_figures(spec, sample, tokenizer_path)
    by_candidate = {}
    for name, path in (candidate_paths or {}).items():
        try:
            by_candidate[name] = list(token_figures(spec, sample, path))
        except Exception:  # noqa: BLE001 - no tokenizer there: the sample's figures stand in
            continue
    return DataFigures(rows, per_row, share, "sampled",
                       [f"{len(sample)} rows sampled, tokens counted with each candidate's tokenizer"
                        + (f" ({Path(tokenizer_path).name}'s where one has none)" if len(by_candidate) < len(
                            candidate_paths or {}) else "")],
                       length_bound(sample, spec.finetune.max_length), by_candidate)


def expected_prune(m) -> tuple[float, str]:
    """The fraction of layers the projection assumes removed, and how it was chosen: `auto` stops where the
    damage does, which only the model stage measures; half its cap is assumed (toy models reach the cap,
    real LLMs stop short of it)."""
    if not m.enabled:
        return 0.0, ""
    if m.prune_ratio == "auto":
        return m.max_prune_ratio / 2, (f" (prune_ratio auto: half of max_prune_ratio {m.max_prune_ratio:g} assumed; "
                                       f"the model stage stops at {m.max_damage:g} damage)")
    return float(m.prune_ratio), ""


def rate(params: float, train: bool, gpu: bool) -> float:
    """FLOP/s per worker of a model this size: training (6 x params per token) or forward passes (2 x)."""
    if gpu:
        return GPU_FLOPS
    return (CPU_TRAIN_FLOPS if train else CPU_FORWARD_FLOPS) * params / (params + SMALL_PARAMS)


def expected_probes(m, layers: int | None, pruned: float) -> int:
    """Damage probes the model stage's search makes when it stops at the assumed count (one per count it
    tries, exactly as damoc/model/compress.py::largest_within tries them)."""
    from damoc.model.compress import largest_within
    from damoc.model.prune import n_to_remove

    if not layers or m.prune_ratio != "auto":
        return 1 if pruned else 0
    stop = round(pruned * layers)
    _, trace = largest_within(lambda n: float(n > stop), n_to_remove(layers, m.max_prune_ratio,
                                                                      m.protect_first_last), 0.0)
    return len(trace) - 1


def data_stage_seconds(spec: JobSpec, chain: list, refs: list[tuple[float, DataFigures]], rows: int,
                       kept_rows: int, gpu: bool) -> float:
    """The data stage (`chain`: its operators): start-up, per-row work, and the reference LMs' forward
    passes (each row's prompt and answer, and the answer alone for IFD) over every row where the filter
    reads its scores, else over the kept rows where only compression does. `refs`: each reference LM's
    parameters and the rows in its tokens; they score equal shares of the rows."""
    scored = rows if any(op.needs_lm or op.needs_embedding for op in chain) else \
        kept_rows if spec.data.compress.enabled else 0
    lm = sum(2 * p * scored * f.tokens_per_row * (2 - f.prompt_share) / rate(p, False, gpu)
             for p, f in refs) / len(refs) if refs and scored else 0.0
    return DATA_FIXED_S + DATA_ROW_S * rows + lm


def model_stage_seconds(spec: JobSpec, c: CandidateFigures, pruned: float, kept_rows: int, cal_tokens_per_row: float,
                        eval_tokens: float, gpu: bool) -> float:
    """One candidate's model-stage actor: start-up and load, the zero-shot pass over the eval rows, and the
    passes over the calibration rows (scores and losses, each damage probe, the pruned and merged losses)."""
    m = spec.model
    if not m.enabled or not c.params:
        return 0.0
    removes = round(pruned * c.layers) > 0 if c.layers else pruned > 0
    passes = 1 + expected_probes(m, c.layers, pruned) + removes + (removes and m.merge.method != "none")
    cal = min(m.calibration.rows, kept_rows) * min(cal_tokens_per_row, m.calibration.max_length)
    flops = 2 * c.params * (passes * cal + eval_tokens)
    return MODEL_FIXED_S + 4 * c.params / LOAD_BYTES_PER_S + flops / rate(c.params, False, gpu)


def trial_fixed_s(mode: str, index: int) -> float:
    """The start-up of the index-th trial (0-based) in this mode."""
    return TRIAL_FIXED_S[mode] if mode == "workers" or index < LOCAL_SLOTS else LOCAL_REUSED_S


def evaluations(steps: int, planned: int, eval_every: int, rungs: list[int]) -> int:
    """Evaluations of a trial that trains `steps` of its `planned` steps: step 0, then every report step."""
    return 1 + sum(1 for k in report_steps(planned, eval_every, rungs) if k <= steps)


@dataclass
class Basis:
    """What the projection stands on: the candidates, the rows, the schedule, the job's resources."""

    spec: JobSpec
    base: str
    cands: list[CandidateFigures]
    data: DataFigures
    train_rows: int | None
    kept_rows: int | None
    eval_rows: int
    chain: list
    budgeted: bool
    pruned: float = 0.0
    auto_note: str = ""
    full_steps: int = 0
    damoc_steps: int = 0
    grace: int = 0
    rungs: list[int] = field(default_factory=list)
    schedule: list[int] = field(default_factory=list)
    refs: list[tuple[float, DataFigures]] = field(default_factory=list)

    @property
    def known(self) -> list[CandidateFigures]:
        return [c for c in self.cands if c.params]

    @property
    def mode(self) -> str:
        return "local" if self.spec.finetune.local else "workers"

    def kept_tokens(self, name: str) -> float:
        """A training row after token compression, in `name`'s tokens."""
        d = self.spec.data
        compress = d.compress.ratio if d.compress.enabled else 1.0
        per_row, share = self.data.tokens(name)
        return per_row * (1 - share * (1 - compress))


def rows_basis(spec: JobSpec, base: str) -> Basis:
    """The candidates' sizes, the data's figures and the rows the stages will train on."""
    from damoc.data.ops import build_chain

    d, ft = spec.data, spec.finetune
    cands = candidate_figures(spec, base)
    local = [resolve_path(c.path, base) for c in spec.candidates if c.path]
    tok_path = resolve_path(d.reference_model, base) if d.reference_model else (local[0] if local else None)
    if tok_path and not Path(tok_path).exists():
        tok_path = None
    data = data_figures(spec, base, tok_path, {c.name: resolve_path(c.path, base) for c in spec.candidates
                                               if c.path and Path(resolve_path(c.path, base)).exists()})
    if data.rows and not (d.train.hf or is_uri(d.train.path or "")):  # read here: counted as the stage will
        train_rows, note = readable_rows(spec, base, data.rows)
        data.notes += [note] if note else []
    else:  # not readable here: the eval split's expected share
        train_rows = int(data.rows * (1 - (d.eval.split_ratio or 0.0))) if data.rows else None
    chain = build_chain(d)
    budgeted = any(op.budgeted for op in chain)  # as the data stage applies keep_ratio
    kept = row_budget(d.filter.keep_ratio, train_rows, budgeted) if train_rows else None
    eval_rows = eval_row_count(spec, base, data.rows)
    eval_rows = min(eval_rows, ft.eval_max_rows) if ft.eval_max_rows else eval_rows
    return Basis(spec, base, cands, data, train_rows, train_rows if kept is None else kept, eval_rows, chain, budgeted)


def schedule_basis(b: Basis) -> Basis:
    """The steps full fine-tuning and DaMoC plan, the scheduler's rungs and each candidate's share."""
    ft, tn = b.spec.finetune, b.spec.tune
    b.full_steps, b.damoc_steps = planned_steps(ft, b.train_rows), planned_steps(ft, b.kept_rows)
    b.pruned, b.auto_note = expected_prune(b.spec.model)
    b.grace, _ = resolve_grace(tn, len(b.cands), b.full_steps, b.damoc_steps, [c.params for c in b.known],
                               [c.params_after(b.pruned) for c in b.known])
    b.rungs = rungs_for(tn, b.grace, b.damoc_steps)
    b.schedule = (scheduler(tn).schedule(len(b.cands), b.rungs, b.damoc_steps, tn.reduction_factor,
                                         not tn.finish_winner) if b.rungs else [b.damoc_steps] * len(b.cands))
    b.refs = reference_lms(b.spec, b.base, b.known, b.data)
    return b


def candidate_costs(b: Basis) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, float]]:
    """Per candidate: FLOPs and seconds of full fine-tuning and of DaMoC's stages; with the totals
    (full_flops, damoc_flops, full_s) and DaMoC's seconds per stage (worker-seconds as the report counts)."""
    spec, ft, gpu = b.spec, b.spec.finetune, b.spec.finetune.use_gpu
    per_step = rows_per_step(ft)
    stage_s = {"data": data_stage_seconds(spec, b.chain, b.refs, b.train_rows or 0, b.kept_rows or 0, gpu),
               "models": 0.0, "finetune": 0.0}
    rows_out, totals = [], {"full_flops": 0.0, "damoc_flops": 0.0, "full_s": 0.0}
    # Candidates are projected best-first by nothing we know yet: the schedule is shared out by size,
    # the largest training longest (the cost's upper end when the largest wins).
    order = sorted(range(len(b.cands)), key=lambda i: -(b.cands[i].params or 0))
    for rank, i in enumerate(order):
        c = b.cands[i]
        after, per_row = c.params_after(b.pruned), b.data.tokens(c.name)[0]
        eval_tokens = (b.eval_rows or 0) * per_row
        f_full = 6 * c.params * b.full_steps * per_step * per_row if c.params else None
        f_damoc = 6 * after * b.schedule[rank] * per_step * b.kept_tokens(c.name) if after else None
        totals["full_flops"] += f_full or 0.0
        totals["damoc_flops"] += f_damoc or 0.0
        # Full fine-tuning as the report projects it: training and start-up (its evaluations not counted).
        totals["full_s"] += (f_full / rate(c.params, True, gpu) / ft.num_workers if f_full else 0.0) + \
            trial_fixed_s(b.mode, rank)
        stage_s["models"] += model_stage_seconds(spec, c, b.pruned, b.kept_rows or 0, b.kept_tokens(c.name),
                                                 eval_tokens, gpu)
        evals = evaluations(b.schedule[rank], b.damoc_steps, ft.eval_every, b.rungs)
        stage_s["finetune"] += trial_fixed_s(b.mode, rank) + (
            (f_damoc / rate(after, True, gpu) + evals * 2 * after * eval_tokens / rate(after, False, gpu))
            / ft.num_workers if f_damoc else 0.0)
        rows_out.append({**{k: v for k, v in asdict(c).items() if k != "shape"}, "params_after": after,
                         "full_steps": b.full_steps, "damoc_steps": b.schedule[rank], "evaluations": evals,
                         "full_flops": f_full, "damoc_flops": f_damoc, "memory_gib": trial_memory_gib(c, ft, b.data)})
    # Worker-seconds as the report counts them: the data stage's seconds, each model actor's seconds x its
    # CPUs, each trial's seconds x its workers.
    stage_s["models"] *= spec.model.num_cpus or 1
    stage_s["finetune"] *= ft.num_workers
    return rows_out, totals, stage_s


def project(spec: JobSpec, base_dir: str | None = None) -> dict[str, Any]:
    """The projection: per candidate and in total, full fine-tuning vs DaMoC."""
    b = schedule_basis(rows_basis(spec, base_dir or os.getcwd()))
    ft = spec.finetune
    unit, per_worker = ("GPU", (ft.resources_per_worker or {}).get("GPU", 1)) if ft.use_gpu else \
        ("CPU", (ft.resources_per_worker or {}).get("CPU", 1))
    rows_out, t, stage_s = candidate_costs(b)
    damoc_s, full_ws = sum(stage_s.values()), t["full_s"] * ft.num_workers
    hours = lambda s: s * per_worker / 3600  # noqa: E731 - resource-hours of worker-seconds
    return {
        "candidates": rows_out, "data": asdict(b.data), "train_rows": b.train_rows, "kept_rows": b.kept_rows,
        "eval_rows": b.eval_rows,
        "full": {"steps": b.full_steps, "flops": t["full_flops"], "seconds": full_ws, "hours": hours(full_ws)},
        "damoc": {"steps": sum(b.schedule), "flops": t["damoc_flops"], "seconds": damoc_s, "hours": hours(damoc_s),
                  "rungs": b.rungs, "stages": {k: round(v, 1) for k, v in stage_s.items()}},
        "ratio_flops": t["full_flops"] / t["damoc_flops"] if t["damoc_flops"] else None,
        "ratio_hours": full_ws / damoc_s if damoc_s else None,
        "unit": f"{unit}-hours",
        "assumptions": assumptions(b),
    }


def assumptions(b: Basis) -> list[str]:
    """Every assumption the projection makes, in words, printed with it."""
    spec, gpu, mode = b.spec, b.spec.finetune.use_gpu, b.mode
    d, m, tn = spec.data, spec.model, spec.tune
    compress = d.compress.ratio if d.compress.enabled else 1.0
    return [
        (f"throughput per worker: {GPU_FLOPS / 1e12:g} TFLOP/s (GPU: bf16 at ~40% of an A100 peak)" if gpu else
         f"throughput per worker (CPU, one thread per CPU, fp32, measured on this project's runs): "
         f"{CPU_TRAIN_FLOPS / 1e9:g} GFLOP/s training, {CPU_FORWARD_FLOPS / 1e9:g} forward, less on small "
         f"models (half at {SMALL_PARAMS / 1e6:g}M parameters)"),
        f"fixed cost {TRIAL_FIXED_S[mode]:g} s per trial ({mode}"
        + (f"; later trials reuse the first {LOCAL_SLOTS} trials' processes: {LOCAL_REUSED_S:g} s" if mode == "local" else "")
        + f"); data stage {DATA_FIXED_S:g} s + "
        f"{DATA_ROW_S * 1e3:g} ms a row + the reference LM's passes "
        f"({reference_words(b.refs)}); model stage {MODEL_FIXED_S:g} s + the weights' load "
        f"+ its passes over {m.calibration.rows} calibration rows and the eval rows, per candidate",
        "training FLOPs = 6 x forward parameters x tokens (the report's count); DaMoC's evaluations at "
        "2 x parameters x eval tokens; full fine-tuning's evaluations not counted (as the report)",
        "memory/worker: what each trial worker asks Ray for (process, weights, trainable state, one "
        "micro-batch's activations, a chunk of logits; damoc/lm/memory.py), on the unpruned model",
        f"DaMoC keeps {d.filter.keep_ratio if b.budgeted else 1:g} of the rows, {compress:g} of the prompt tokens, "
        f"removes {b.pruned:g} of the layers{b.auto_note}; ASHA rungs {b.rungs or '-'} "
        f"(rf {tn.reduction_factor:g}){', stopped once decided' if b.rungs and not tn.finish_winner else ''}"
        + (f"; grace period auto: {b.grace} steps for a {tn.target_saving:g}x saving in rows x parameters "
           f"(not under {tn.min_grace_period})" if tn.grace_period == "auto" else ""),
        *b.data.notes, *[f"{c.name}: {c.note}" for c in b.cands if c.note],
    ]


def eval_row_count(spec: JobSpec, base: str, rows: int | None) -> int:
    """Rows each evaluation scores before eval_max_rows: a local eval file's rows, or the split's share."""
    ev = spec.data.eval
    if ev.split_ratio:
        return round((rows or 0) * ev.split_ratio)
    if ev.path and not is_uri(ev.path):
        try:
            return count_rows(ev, base)
        except OSError:
            pass
    return ev.rows or spec.finetune.eval_max_rows or 0


def reference_lms(spec: JobSpec, base: str, known: list[CandidateFigures],
                  data: DataFigures) -> list[tuple[float, DataFigures]]:
    """The data stage's reference LMs as the stage picks them (data.reference_model, else the local
    candidates sharing the rows, or the smallest of them): each one's parameters and the rows in its
    tokens (the sample's where its tokenizer is not known)."""
    d = spec.data

    def own(c: CandidateFigures) -> tuple[float, DataFigures]:
        per_row, share = data.tokens(c.name)
        return c.params, replace(data, tokens_per_row=per_row, prompt_share=share)

    smallest = min(known, key=lambda c: c.params, default=None)
    if d.reference_model:
        try:
            return [(float(config_params(resolve_path(d.reference_model, base), False, None)[0]), data)]
        except Exception:  # noqa: BLE001 - unreadable here: the smallest candidate's figure stands in
            return [(smallest.params, data)] if smallest else []
    local = {c.name for c in spec.candidates if c.path}
    scorers = [c for c in known if c.name in local] or known
    if d.reference_lm == "smallest" or not scorers:
        return [own(smallest)] if smallest else []
    return [own(c) for c in scorers]


def reference_words(refs: list[tuple[float, DataFigures]]) -> str:
    if len(refs) > 1:
        return (f"{len(refs)} candidates share the rows, "
                f"{sum(p for p, _ in refs) / len(refs) / 1e6:,.3g}M parameters on average")
    return f"{refs[0][0] / 1e6:,.3g}M parameters" if refs else "none known"


def trial_memory_gib(c: CandidateFigures, ft, data: DataFigures) -> float | None:
    """What one worker of this candidate's trial asks Ray for (the finetune stage's estimate, on the
    unpruned model: the full fine-tuning's figure and DaMoC's upper end)."""
    from damoc.lm.memory import GIB, finetune_memory

    if c.shape is None:
        return None
    length = data.length or min(ft.max_length, round(2 * data.tokens_per_row))
    return round(finetune_memory(c.shape, ft, length).host / GIB, 2)


def format_plan(p: dict[str, Any]) -> str:
    def num(v, fmt="{:,.0f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"{'candidate':<18} {'params':>14} {'after prune':>14} {'from':>7} {'full steps':>10} "
             f"{'DaMoC steps':>11} {'full FLOPs':>11} {'DaMoC FLOPs':>11} {'memory/worker':>13}"]
    for c in p["candidates"]:
        lines.append(f"{c['name']:<18} {num(c['params']):>14} {num(c['params_after']):>14} {c['source']:>7} "
                     f"{c['full_steps']:>10} {c['damoc_steps']:>11} {num(c['full_flops'], '{:.2e}'):>11} "
                     f"{num(c['damoc_flops'], '{:.2e}'):>11} {num(c.get('memory_gib'), '{:.1f} GiB'):>13}")
    d = p["data"]
    lines += ["", f"training rows: {num(p['train_rows'])} (kept by DaMoC: {num(p['kept_rows'])}); "
                  + (", ".join(f"{n} {v[0]:.0f}" for n, v in d["by_candidate"].items()) + " tokens per row"
                     if d.get("by_candidate") else f"{d['tokens_per_row']:.0f} tokens per row") + f" ({d['source']})",
              f"fine-tuning every candidate in full: {p['full']['flops']:.3g} FLOPs, "
              f"~{p['full']['hours']:.3g} {p['unit']}",
              f"DaMoC: {p['damoc']['flops']:.3g} FLOPs, ~{p['damoc']['hours']:.3g} {p['unit']} ("
              + ", ".join(f"{k} ~{v:,.0f} s" for k, v in p['damoc']['stages'].items()) + " of workers)",
              f"DaMoC against fine-tuning every candidate in full: {cost_words(p['ratio_hours'])} in {p['unit']}, "
              f"{cost_words(p['ratio_flops'])} in training FLOPs", "", "assumptions:"]
    lines += [f"  - {a}" for a in p["assumptions"]]
    return "\n".join(lines)
