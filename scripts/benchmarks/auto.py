#!/usr/bin/env python
"""`learner: auto` on the shipped configs, through `pocketflow run`, next to the best hand recipe.

    python scripts/benchmark.py auto                     # every case (seed CNN ~15 min each)
    python scripts/benchmark.py auto --case seed-download
    python scripts/benchmark.py auto --quick             # seed-download on the test sample, 4 trials

Every number of the auto rows comes from the run's own metrics.json: the ratio measured on the
file `best/` ships (named in the table), the shipped file's accuracy in the TFLite interpreter on
the full test split, the search's wall time. The hand recipes are the bar: `seed_table.json`
(scripts/benchmarks/seed_table.py, the same seed CNN / MNIST / 4-epoch baseline recipe), read
from its page with its own date, and for the ResNet-20 cases `HAND`, measured here with `--hand`
(the same config and fine-tune through `pocketflow run`, the settings an engineer would pick, no search).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DOCS, ROOT, md_table, write_page

SHARED = ROOT.parent / "shared"
CASES = {  # name -> (config, --set overrides, what the hand recipe row is)
    "seed-download": ("configs/seed_cnn_mnist_download.yaml", [], "more pruned + fewer clusters + QAT + TFLite"),
    "seed-size": ("configs/seed_cnn_mnist_size.yaml", [], None),
    "vgg-download": ("configs/vgg_small_download.yaml",
                     [f"model.name={SHARED / 'models' / 'vgg_small_fashion_mnist.keras'}"], None),
    "resnet-latency": ("configs/resnet20_latency.yaml",
                       [f"model.name={SHARED / 'models' / 'resnet20_fashion_mnist.keras'}"], None),
    "resnet-latency-6x": ("configs/resnet20_latency.yaml",
                          [f"model.name={SHARED / 'models' / 'resnet20_fashion_mnist.keras'}", "target.ratio=6"], None),
}
# the smoke version: the shipped Fashion-MNIST sample (works without ../shared), a short search
QUICK = ["data.name=npz", f"data.path={ROOT / 'tests' / 'data' / 'fashion_mnist_small.npz'}", "train.epochs=1",
         "learner.fine_tune.epochs=1", "search.trials=4", "search.trial_steps=30"]


# hand recipes with our own parts, through the same config and fine-tune, no search: what an
# engineer would set by hand (QAT at a quarter of the config's learning rate, as auto's recipe does)
HAND = {
    "resnet-latency": ("int8 QAT alone, no search",
                       ["learner.name=uniform_quant", "learner.fine_tune.learning_rate=0.0025", "search={optimizer: none}"]),
    "resnet-latency-6x": ("channels at one keep ratio -> int8 QAT, no search",
                          ["learner.name=chain", "learner.steps=[channel_pruning, uniform_quant]",
                           "learner.uniform_quant={fine_tune: {learning_rate: 0.0025}}", "search={optimizer: none}"]),
}


def run_case(name: str, quick: bool, out: Path, hand: bool = False) -> dict:
    config, overrides, _ = CASES[name]
    sets = overrides + (QUICK if quick else []) + (HAND[name][1] if hand else [])
    cmd = [sys.executable, "-m", "pocketflow", "run", str(ROOT / config), "--output", str(out), "--force"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name}: pocketflow run failed:\n{proc.stderr[-3000:]}")
    cfg_name = next(ln.split(":", 1)[1].strip() for ln in (ROOT / config).read_text().splitlines()
                    if ln.startswith("name:"))
    m = json.loads((out / cfg_name / "best" / "metrics.json").read_text())
    t = m["target"]
    shipped = m["shipped"]
    base = m["baseline"]["test_accuracy"]
    mix = m.get("search", {}).get("methods", {})
    method = m["info"].get("method") or m["learner"]
    return {"case": name, "config": config, "target": f"{t['metric']} {t['ratio']:g}x",
            "method": f"hand: {HAND[name][0]} ({method})" if hand else method, "file": shipped["file"],
            "ratio": m["ratios"][t["metric"]], "baseline": base, "tflite": shipped["test_accuracy"],
            "delta_pt": 100 * (shipped["test_accuracy"] - base),
            "minutes": (time.time() - t0) / 60,
            "search_minutes": m.get("search", {}).get("wall_seconds", 0) / 60,
            "overhead": m.get("search", {}).get("search_overhead_share"),
            "methods": ", ".join(f"{k} {v}/{mix.get('top', 0)}" for k, v in mix.get("best", {}).items()),
            "ratios": m["ratios"], "log": proc.stdout[-4000:], "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(
                ["pocketflow run", config] + [f"--set {s}" for s in sets])}


def hand_rows(case: str) -> list[dict]:
    """The best hand recipe for a case from its page's JSON (seed_table.json), with its ratio."""
    _, _, row_name = CASES[case]
    page = DOCS / "seed_table.json"
    if row_name is None or not page.exists():
        return []
    rows = json.loads(page.read_text())["rows"]
    base = next(r for r in rows if r["tool"] == "pocketflow" and r["name"] == "baseline")
    out = []
    for r in rows:
        if r["name"] == row_name or (r["tool"] == "TFMOT" and "PCQAT" in r["name"]):
            tb = base if r["tool"] == "pocketflow" else next(x for x in rows if x["tool"] == "TFMOT" and x["name"] == "baseline")
            out.append({"case": case, "method": f"hand: {r['tool']} {r['name']}", "file": "int8 TFLite",
                        "ratio": tb["tflite_gzip_bytes"] / r["tflite_gzip_bytes"], "baseline": tb["tflite_accuracy"],
                        "tflite": r["tflite_accuracy"], "delta_pt": 100 * (r["tflite_accuracy"] - tb["tflite_accuracy"])})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", action="append", choices=list(CASES))
    ap.add_argument("--hand", action="store_true", help="also run the case's hand recipe (HAND) here")
    a = ap.parse_args(argv)
    started = time.time()
    cases = a.case or (["seed-download"] if a.quick else
                       [c for c in CASES if not CASES[c][1] or (SHARED / "models").exists()])
    name = "auto_quick" if a.quick else "auto"
    rows = []
    with tempfile.TemporaryDirectory(prefix="pocketflow-bench-auto-") as d:
        for c in cases:
            r = run_case(c, a.quick, Path(d))
            print({k: v for k, v in r.items() if k not in ("log", "ratios")}, flush=True)
            rows += [r] + ([] if a.quick else hand_rows(c))
            if a.hand and c in HAND:
                try:  # a failed hand run must not lose the auto row just measured
                    rows.append(run_case(c, a.quick, Path(d), hand=True))
                    print({k: v for k, v in rows[-1].items() if k not in ("log", "ratios")}, flush=True)
                except RuntimeError as e:
                    print(f"hand recipe of {c} failed: {e}", file=sys.stderr, flush=True)
    if not a.quick and (DOCS / f"{name}.json").exists():  # the cases not run now keep their last rows
        kept = [r for r in json.loads((DOCS / f"{name}.json").read_text())["rows"] if r["case"] not in cases
                or (not a.hand and r["method"].startswith("hand: ") and "command" in r)]  # hand rows run here
        rows = sorted(kept + rows, key=lambda r: list(CASES).index(r["case"]))
    cols = [("case", "case", ""), ("method", "method", ""), ("target", "target", ""), ("file", "measured on", ""),
            ("ratio", "ratio", ".2f"), ("baseline", "baseline acc", ".4f"), ("tflite", "shipped acc (TFLite)", ".4f"),
            ("delta_pt", "Δ pt", "+.2f"), ("search_minutes", "search min", ".1f"), ("overhead", "overhead", ".1%"),
            ("methods", "methods of the best trials", "")]
    body = ["Auto rows: `pocketflow run` on the config named, nothing hand-set (commands below). Hand rows:",
            "the best hand recipe of `docs/benchmarks/seed_table.md` (its own date and machine), our parts",
            "and TFMOT's, on the same model, data and baseline recipe; their ratio is the int8 TFLite file",
            "gzip'd against the float baseline file gzip'd, as `download_size` measures.", "",
            md_table(rows, cols), "", "## Commands", ""]
    body += [f"- {r['case']}: `{r['command']}` ({r['minutes']:.1f} min in all; {r.get('date', '')})"
             for r in rows if "command" in r]
    body += ["", "## Logs (tail)", ""]
    for r in rows:
        if "log" in r:
            body += [f"### {r['case']}", "", "```", r["log"].strip(), "```", ""]
    write_page(name, "learner: auto on the shipped configs vs hand recipes",
               "python scripts/benchmark.py auto" + (" --quick" if a.quick else ""), "\n".join(body), started,
               extra={"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
