"""Tables and figures of error against in-context examples and loop iterations, for a run, runs on
the same prompts (experiments.py) and the report; drawn off screen, written whole (atomic)."""

import os

from harness import atomic


def figure(*args, **kw):
    """plt.subplots(*args, **kw) on the Agg backend, so that it draws where no display is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def save_figure(fig, path):
    """Lay the figure out and write it as a PNG, whole or not at all, then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def table(runs, title, baseline_names):
    """Error at a few k for runs [(name, cfg, errors)] on the same prompts, and the first run's
    baselines (baseline_names, keys of its errors)."""
    _, cfg, errors = runs[0]
    ks = (1, cfg.n_dims // 2, cfg.n_dims, 2 * cfg.n_dims, cfg.n_points - 1)
    ks = sorted({k for k in ks if 0 < k < cfg.n_points})
    rows = {}
    for name, c, e in runs:
        rows[name] = e["loops"][c.n_loops - 1]
        if c.eval_loops != c.n_loops:
            rows[f"{name}: {c.eval_loops} loops"] = e["loops"][-1]
    rows.update({name: errors[name] for name in baseline_names})
    width = max(26, *map(len, rows)) + 2
    lines = [f"normalised squared error, {title}, d = {cfg.n_dims}, {cfg.eval_prompts} prompts"]
    lines.append(f"{'k (in-context examples)':<{width}}" + "".join(f"{k:>9}" for k in ks))
    for name, err in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{err[k].item():>9.4f}" for k in ks))
    return "\n".join(lines)


def plot(runs, out, title, baseline_names, suffix="", solvers=None, loops=True):
    """Figures in out for runs [(name, cfg, errors)] on the same prompts: error against k (every
    run, and the first run's baselines) and, with loops, error at the last k against iterations
    (every looped run; solvers: name -> error after each of its iterations, one per loop)."""
    _, cfg, errors = runs[0]
    fig, ax = figure(figsize=(6.5, 4.5))
    curves = [(name, e["loops"][c.n_loops - 1], e["band looped"], 2.5) for name, c, e in runs]
    curves += [(name, errors[name], errors[f"band {name}"], 1.5) for name in baseline_names]
    for i, (name, err, band, lw) in enumerate(curves):
        ax.plot(err, lw=lw, color=f"C{i}", label=name)
        ax.fill_between(range(cfg.n_points), *band, color=f"C{i}", alpha=0.2, lw=0)
    ax.set(xlabel="in-context examples k", ylabel="normalised squared error", ylim=(-0.05, 1.5))
    ax.set_title(f"{title}, d = {cfg.n_dims} (90% bootstrap bands)")
    figures = [(fig, ax, "examples")]
    if loops and any(c.eval_loops > 1 for _, c, _ in runs):
        fig, ax = figure(figsize=(6.5, 4.5))
        last = cfg.n_points - 1
        looping = [(name, c, e) for name, c, e in runs if c.eval_loops > 1]
        curves = [(name, e["loops"][:, last], 2.5, c.n_loops) for name, c, e in looping]
        curves += [(f"{n} iterations", err, 1.5, None) for n, err in (solvers or {}).items()]
        for i, (name, err, lw, b) in enumerate(curves):
            steps = range(1, len(err) + 1)
            ax.semilogy(steps, err.clamp(min=1e-12), lw=lw, color=f"C{i}", label=name)
            if b:
                ax.axvline(b, color=f"C{i}", ls="--", lw=1)
        floor = min(err.min().item() for _, err, _, _ in curves)
        xlabel = f"loop iteration{' (or solver iteration)' if solvers else ''}; dashed: trained b"
        ax.set(xlabel=xlabel, ylabel=f"normalised squared error at k = {last}")
        ax.set_title(f"{title}: error against iterations")
        ax.set_ylim(max(floor / 3, 1e-8), None)  # the exact solvers reach 1e-14
        figures.append((fig, ax, "loops"))
    for fig, ax, name in figures:
        ax.legend(fontsize=8)
        save_figure(fig, os.path.join(out, f"error_vs_{name}{suffix}.png"))
