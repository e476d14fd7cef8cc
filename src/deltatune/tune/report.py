"""What ``deltatune tune`` shows and writes: the trial table, the best config, the history plot."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deltatune.plan.config_writer import render_yaml, write_yaml_checked
from deltatune.plan.report import table


def _value(trial: Any) -> float | None:
    """A trial's value, or for a pruned trial its last reported intermediate value."""
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def trials_table(study: Any) -> str:
    """Every trial: number, state, value (pruned: last reported, marked ``*``), steps, time, parameters."""
    trials = study.get_trials(deepcopy=False)
    names: list[str] = []
    for t in trials:
        names.extend(k for k in t.params if k not in names)
    rows = []
    best = study.best_trial.number if any(t.state.name == "COMPLETE" for t in trials) else None
    for t in trials:
        v = _value(t)
        shown = "-" if v is None else f"{v:.4f}" + ("*" if t.state.name == "PRUNED" else "")
        state = t.state.name.lower() + (" (interrupted)" if t.user_attrs.get("interrupted") else "")
        secs = f"{t.duration.total_seconds():.0f} s" if t.duration is not None else "-"
        steps = max(t.intermediate_values) if t.intermediate_values else "-"
        params = [_fmt(t.params.get(n, "")) for n in names]
        rows.append([f"{t.number}{' <- best' if t.number == best else ''}", state, shown, steps, secs, *params])
    headers = ["trial", "state", "eval loss", "last step", "time", *names]
    return table(headers, rows, "llrrr" + "r" * len(names)) + "\n(* pruned: last reported eval loss)"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_best_config(study: Any, tree: dict[str, Any] | None, path: Path) -> Path | None:
    """Write ``tree``, the best trial's train config (:func:`deltatune.tune.study.best_tree`), as YAML
    (validated), or return None if no trial completed (``tree`` is None)."""
    if tree is None:
        return None
    best = study.best_trial
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    header = (f"Best configuration of study {study.study_name!r}: trial {best.number}, eval loss {best.value:.4f}\n"
              f"({params}). Written by `deltatune tune`; run it with: deltatune train {path.name}")
    return write_yaml_checked(render_yaml(tree, header=header), path)


def plot_history(study: Any, path: Path) -> Path | None:
    """Save the optimisation history (value per trial, pruned trials marked, best so far) as a PNG.

    Returns None (with nothing written) when matplotlib is missing or no trial has a value.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no history.png; pip install 'deltatune[plot]'")
        return None
    trials = [t for t in study.get_trials(deepcopy=False) if _value(t) is not None]
    if not trials:
        return None
    minimize = study.direction.name == "MINIMIZE"
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    ax.scatter([t.number for t in done], [t.value for t in done], label="completed", color="tab:blue", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [_value(t) for t in pruned], marker="x", color="tab:red",
                   label="pruned (last reported)", zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t.number):
        if best is None or (t.value < best if minimize else t.value > best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:
        last = max(t.number for t in trials)
        ax.step(xs + [last], ys + [ys[-1]], where="post", color="tab:green", label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("eval loss")
    ax.set_title(f"optimisation history: {study.study_name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
