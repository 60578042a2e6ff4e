"""The demo's two charts (PNG, matplotlib's Agg backend): the probe's accuracy per block, and the training curves."""
import json

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLES = {"sra": "-", "baseline": "--"}


def plot_probe(results, path, title):
    """results: {run name: probe.probe(...) result}. Accuracy against block, one colour per noise level t,
    SRA solid and the baseline dashed; chance (10%) dotted."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(next(iter(results.values()))["times"])))
    for name, result in results.items():
        for colour, t, accuracy in zip(colours, result["times"], result["accuracy"]):
            blocks = np.arange(1, len(accuracy) + 1)
            ax.plot(blocks, accuracy, STYLES.get(name, "-"), color=colour, marker="o", markersize=3,
                    label=f"{name}, t={t:g}")
    ax.axhline(0.1, color="gray", linestyle=":", label="chance")
    ax.set(xlabel="block", ylabel="linear probe accuracy (held-out digits)", title=title, ylim=(0, 1))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def smooth(values, window):
    """Trailing moving average over `window` values (fewer at the start), as long as `values`."""
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    ends = np.arange(1, len(cumulative))
    counts = np.minimum(ends, window)
    return (cumulative[ends] - cumulative[ends - counts]) / counts


def read_losses(path):
    """(steps, denoising losses, alignment losses) of train.py's losses.jsonl."""
    records = [json.loads(line) for line in open(path)]
    return tuple(np.array([r[key] for r in records]) for key in ("step", "loss", "align_loss"))


def plot_curves(loss_files, path, title):
    """loss_files: {run name: losses.jsonl}. Left: every run's denoising loss; right: the alignment loss
    (unweighted) of the runs that have one. Raw values faint, a moving average over 5% of the steps on top."""
    fig, (denoising_ax, align_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, loss_file in loss_files.items():
        steps, denoising, align = read_losses(loss_file)
        window = max(1, len(steps) // 20)
        axes = [(denoising_ax, denoising)] + ([(align_ax, align)] if np.any(align) else [])
        for ax, values in axes:
            line, = ax.plot(steps, smooth(values, window), STYLES.get(name, "-"), label=name)
            ax.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.5)
    denoising_ax.set(xlabel="step", ylabel="denoising loss (flow matching MSE)")
    align_ax.set(xlabel="step", ylabel="alignment loss (unweighted)")
    for ax in (denoising_ax, align_ax):
        if ax.get_legend_handles_labels()[0]:  # a baseline-only run has no alignment loss to show
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
