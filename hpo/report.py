"""runs/<name>/report.md: what the search tried and found, read from the study alone.

Reading only the study (not the process that ran it) makes the report safe on a partial or
still-running study and identical whichever worker writes it. Plots are PNGs rendered with
matplotlib's Agg backend; every file is written atomically.
"""
from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

from pocketflow.io import atomic_write_bytes, atomic_write_text


def _rows(trials) -> list[dict]:
    from pocketflow.hpo.study import holds_slot, is_feasible
    rows = []
    for t in trials:
        a = t.user_attrs
        rows.append({
            "number": t.number, "state": t.state.name.lower(), "void": not holds_slot(t),
            "params": a.get("projected") or a.get("params") or dict(t.params),
            "ratio": a.get("ratio"), "val_acc": a.get("val_acc", t.values[0] if t.state.name == "COMPLETE" else None),
            "feasible": is_feasible(t), "seconds": a.get("seconds"),
            "note": a.get("fail_reason") or a.get("prune_reason") or "",
        })
    return rows


def pareto(points: list[tuple[float, float, int]]) -> list[int]:
    """Trial numbers of (ratio, accuracy, number) points no other point beats in both."""
    front, best_acc = [], -math.inf
    for r, a, n in sorted(points, key=lambda p: (-p[0], -p[1])):
        if a > best_acc:
            front.append(n)
            best_acc = a
    return front


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def summarize_params(params: dict, limit: int = 6) -> str:
    """Short text for a point: plain params as k=v, per-layer groups ('kind/layer') as ranges."""
    plain, groups = [], defaultdict(list)
    for k, v in params.items():
        if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
            groups[k.rsplit("/", 1)[0]].append(v)
        else:
            plain.append(f"{k}={_fmt(v)}")
    parts = plain[:limit] + ([f"+{len(plain) - limit} more"] if len(plain) > limit else [])
    for g, vs in groups.items():
        parts.append(f"{g}/*: mean {_fmt(sum(vs) / len(vs))} [{_fmt(min(vs))}–{_fmt(max(vs))}] ×{len(vs)}")
    return ", ".join(parts)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plot_tradeoff(rows, target, metric, path: Path) -> bool:
    import matplotlib.pyplot as plt
    done = [r for r in rows if r["state"] == "complete" and r["ratio"] is not None and r["val_acc"] is not None]
    if not done:
        return False
    pts = [(r["ratio"], r["val_acc"], r["number"]) for r in done]
    fig, ax = plt.subplots(figsize=(6, 4))
    for feasible, style in ((True, dict(c="tab:blue", label="meets target")),
                            (False, dict(c="tab:gray", marker="x", label="misses target"))):
        sel = [r for r in done if r["feasible"] == feasible]
        if sel:
            ax.scatter([r["ratio"] for r in sel], [r["val_acc"] for r in sel], zorder=2, **style)
    front = set(pareto(pts))
    fp = sorted([p for p in pts if p[2] in front])
    ax.plot([p[0] for p in fp], [p[1] for p in fp], "o--", c="tab:red", mfc="none", ms=10,
            label="Pareto front", zorder=3)
    for r, a, n in pts:
        ax.annotate(str(n), (r, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if target is not None:
        ax.axvline(target, c="tab:green", ls=":", label=f"target {target:g}x")
    ax.set_xlabel(f"measured {metric} ratio (x)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"accuracy vs {metric} ratio (completed trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _plot_progress(rows, path: Path) -> bool:
    import matplotlib.pyplot as plt
    done = [r for r in rows if not r["void"] and r["state"] in ("complete", "pruned", "fail")]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs, best, cur = [], [], None
    for r in done:
        if r["feasible"] and (cur is None or r["val_acc"] > cur):
            cur = r["val_acc"]
        xs.append(r["number"])
        best.append(cur if cur is not None else math.nan)
    comp = [r for r in done if r["state"] == "complete" and r["val_acc"] is not None]
    ax.scatter([r["number"] for r in comp], [r["val_acc"] for r in comp], c="tab:gray", s=15, label="trial")
    ax.step(xs, best, where="post", c="tab:blue", label="best so far (meets target)")
    ax.set_xlabel("trial number")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _plot_layers(params: dict, path: Path) -> bool:
    """One bar chart per per-layer parameter kind ('kind/layer' names) of the best point."""
    import matplotlib.pyplot as plt
    groups = defaultdict(dict)
    for k, v in params.items():
        if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
            kind, layer = k.rsplit("/", 1)  # 'sparsity/conv1', 'weight_sparsity/sparsity/conv1'
            groups[kind][layer] = v
    if not groups:
        return False
    n = len(groups)
    width = max(6, 0.35 * max(len(g) for g in groups.values()))
    fig, axes = plt.subplots(n, 1, figsize=(width, 2.8 * n), squeeze=False)
    for ax, (kind, vals) in zip(axes[:, 0], groups.items()):
        ax.bar(range(len(vals)), list(vals.values()), color="tab:blue")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(list(vals), rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(kind)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title("per-layer settings of the best trial")
    _save(fig, path)
    return True


def write_report(study, run_dir) -> Path:
    """Write report.md and its PNGs into `run_dir`; works on a partial study."""
    import matplotlib
    matplotlib.use("Agg")
    from pocketflow.hpo.study import best_trial
    run_dir = Path(run_dir)
    trials = study.get_trials(deepcopy=False)
    rows = _rows(trials)
    ident = study.user_attrs.get("pocketflow", {})
    metric, target = ident.get("metric", "size"), ident.get("ratio")
    best = best_trial(trials)
    lines = [f"# Search report: {study.study_name}", ""]
    lines.append(f"- learner: `{ident.get('learner', '?')}`; target: "
                 + (f"{metric} ≥ {target:g}x (trials within 1% count)" if target is not None else "none"))
    n = {s: sum(1 for r in rows if r["state"] == s and not r["void"])
         for s in ("complete", "pruned", "fail", "running", "waiting")}
    voids = sum(1 for r in rows if r["void"])
    lines.append(f"- trials: {n['complete']} complete, {n['pruned']} pruned, {n['fail']} failed, "
                 f"{n['running']} running, {n['waiting']} queued"
                 + (f", {voids} interrupted/surplus (not counted)" if voids else ""))
    if best is not None:
        a = best.user_attrs
        lines.append(f"- best: trial {best.number}, validation accuracy {best.values[0]:.4f}"
                     + (f", measured {metric} {a['ratio']:.2f}x" if a.get("ratio") is not None else ""))
        lines.append(f"- best params: {summarize_params(a.get('projected') or best.params, limit=20)}")
        from pocketflow.hpo.progress import method_mix, mix_line
        mix = method_mix(trials)
        if mix:
            lines.append(f"- {mix_line(mix)}")
    else:
        lines.append("- best: no completed trial meets the target yet")
    lines.append("")
    figs = [("tradeoff.png", "Accuracy vs measured ratio",
             lambda p: _plot_tradeoff(rows, target, metric, p)),
            ("progress.png", "Best so far", lambda p: _plot_progress(rows, p))]
    if best is not None:
        figs.append(("best_layers.png", "Per-layer settings of the best trial",
                     lambda p: _plot_layers(best.user_attrs.get("projected") or best.params, p)))
    for name, title, draw in figs:
        if draw(run_dir / name):
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    from pocketflow.hpo.pareto_report import section
    lines += section(study, run_dir, _save)  # pareto mode: the front, exported points measured on test
    lines += ["## Trials", "", "| # | state | params | ratio | val acc | time (s) | note |",
              "|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        state = r["state"] + (" (void)" if r["void"] else "") + ("" if r["feasible"] or r["state"] != "complete"
                                                              else " (misses target)")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        acc = f"{r['val_acc']:.4f}" if r["val_acc"] is not None else ""
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else ""
        note = str(r["note"]).replace("|", "/").replace("\n", " ")[:120]
        lines.append(f"| {r['number']} | {state} | {summarize_params(r['params']).replace('|', '/')} | {ratio} | "
                     f"{acc} | {secs} | {note} |")
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
