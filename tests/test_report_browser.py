"""The report in a real browser: headless Chromium opens a copy of report.html moved away from its run
(it must stand alone), every plot loads and the ranking table is there."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from damoc.report.build import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth}));
  const heads = [...document.querySelectorAll('table th')].map(th => th.textContent);
  // the first screen: what is in view before any scrolling (the window is 1280 x 1000)
  const first = [...document.body.children].filter(el => el.getBoundingClientRect().bottom <= window.innerHeight)
    .map(el => ({tag: el.tagName, text: el.textContent}));
  const pre = document.createElement('pre'); pre.id = 'damoc-check';
  pre.textContent = JSON.stringify({imgs, heads, first});
  document.body.appendChild(pre);
});</script>"""


def fake_run(root: Path) -> Path:
    """A run directory with every file the report reads, written by hand (no stage runs)."""
    run = root / "run"
    for sub in ("data", "models/a", "models/b", "finetune/eval_rows/a", "finetune/eval_rows/b"):
        (run / sub).mkdir(parents=True)
    (run / "spec.yaml").write_text(yaml.safe_dump({"seed": 0, "finetune": {"batch_size": 4, "num_workers": 1,
                                                                          "max_steps": 8}}))
    (run / "data" / "manifest.json").write_text(json.dumps({
        "input": 40, "kept": 10, "quarantined": 2, "dropped": {"ifd>1": 20, "held_out_eval": 8}, "readable": 30,
        "tokens_before": 400, "tokens_after": 240, "operators": [{"name": "read", "in": 40, "out": 38}],
        "examples": {"compress": [{"before": {"instruction": "What is the capital of France?", "input": ""},
                                   "after": {"instruction": "capital France?", "input": ""}}]}}))
    models = []
    for i, name in enumerate(("a", "b")):
        models.append({"name": name, "status": "compressed", "path": str(run / "models" / name)})
        (run / "models" / name / "compression.json").write_text(json.dumps({
            "scores": [0.5, 0.1, 0.2, 0.6], "removed": [1, 2], "protected": [0, 3], "score": "block_influence",
            "layers_before": 4, "layers_after": 2, "params_before": 1000, "params_after": 600,
            "calibration_loss": {"original": 3.0, "pruned": 3.1, "merged": 3.05},
            "zero_shot": {"original": 3.0 + i, "compressed": 3.1 + i, "rows": 4}}))
    (run / "models" / "models.json").write_text(json.dumps({"enabled": True, "candidates": models}))
    entries = []
    for i, name in enumerate(("a", "b")):
        curve = [{"step": s, "eval_loss": 3.0 + i - 0.1 * s} for s in (0, 4, 8)]
        timeline = {"fixed": 2.0, "training": 1.0, "evaluation": 0.5, "checkpointing": 0.1, "rung_wait": 0.2,
                    "total": 3.8, "waiting_for_resources": 0.0}
        entries.append({"name": name, "status": "finished" if i == 0 else "stopped_early", "steps": 8 if i == 0 else 4,
                        "curve": curve if i == 0 else curve[:2], "score": curve[-1 if i == 0 else 1]["eval_loss"],
                        "worker_seconds": 3.8, "workers": 1, "train_tokens": 320, "train_flops": 1.9e6,
                        "timeline": timeline, "source": {"path": f"zoo/{name}"},
                        **({"adapter": {"path": "adapters/a", "step": 8}} if i == 0 else {})})
        for s in (0, 4, 8):
            rows = {str(r): {"nll": 2.0 + i + 0.1 * r, "bytes": 3} for r in range(4)}
            (run / "finetune" / "eval_rows" / name / f"step-{s}.json").write_text(json.dumps({"step": s, "rows": rows}))
    (run / "finetune" / "results.json").write_text(json.dumps({
        "metric": "eval_loss", "mode": "min", "scheduler": "asha", "rungs": [4], "max_steps": 8, "num_workers": 1,
        "method": "lora", "max_concurrent_trials": 2, "candidates": entries}))
    return run


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (apt-get install -y chromium; CI installs it)")
def test_report_opens_in_chromium_with_every_plot_and_the_ranking(tmp_path):
    run = fake_run(tmp_path)
    write_report(run, run / "report")
    moved = tmp_path / "elsewhere" / "report.html"  # alone, away from its PNG files
    moved.parent.mkdir()
    moved.write_text((run / "report" / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                              "--window-size=1280,1000", "--dump-dom", moved.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    start = out.stdout.index('<pre id="damoc-check">') + len('<pre id="damoc-check">')
    check = json.loads(out.stdout[start:out.stdout.index("</pre>", start)].replace("&quot;", '"'))
    assert len(check["imgs"]) >= 5 and all(i["width"] > 0 for i in check["imgs"]), check["imgs"]
    assert {"rank", "candidate", "eval_loss", "95% interval"} <= set(check["heads"])
    first = " ".join(el["text"] for el in check["first"])
    assert "Pick: a, of 2 ranked candidate(s)" in first and "How sure: a's eval_loss is lower" in first
    assert "This run cost" in first or "Cost: this run cost" in first
    code = [el["text"] for el in check["first"] if el["tag"] == "PRE"]
    assert any("PeftModel.from_pretrained" in c for c in code) and any("scheduler: none" in c for c in code)
