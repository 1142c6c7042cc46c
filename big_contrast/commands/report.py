"""What a finished run or an eval shows a person: a results table and a loss / accuracy plot."""

from __future__ import annotations

import io

from etils import epath

from big_contrast import paths
from big_contrast.train.metrics import read_metrics
from big_contrast.workdir import Workdir

TRAIN_KEYS = ("loss", "scale", "bias", "learning_rate", "grad_norm", "examples_per_s", "mfu")


def format_results(results: dict) -> str:
    """Evaluation metrics (names with a '/') as a table; then the last training scalars."""
    from big_contrast.evaluate import format_table

    evals = {k: v for k, v in results.items() if "/" in k and not k.startswith(("skipped/", "seen/"))}
    lines = [format_table(evals)] if evals else []
    train = [f"{k}={results[k]:.4g}" for k in TRAIN_KEYS if k in results]
    if train:
        lines.append("train: " + "  ".join(train))
    return "\n".join(lines)


def plot_run(workdir) -> epath.Path | None:
    """The workdir's plot.png: training loss and every evaluation metric against the step."""
    workdir = Workdir.of(workdir)
    rows = read_metrics(workdir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    eval_keys = sorted({k for r in rows for k in r
                        if "/" in k and not k.startswith(("skipped/", "seen/")) and not k.endswith("/skipped")})
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    if loss:
        ax_loss.plot(*zip(*loss), marker=".")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax_eval.plot(*zip(*points), marker="o", label=key)
    ax_eval.set(xlabel="step", ylabel="accuracy / recall", title="evaluation", ylim=(0, 1))
    if eval_keys:
        ax_eval.legend(fontsize=7)
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path, image = workdir.plot, io.BytesIO()
    fig.savefig(image, format="png", dpi=110)  # bytes first: a bucket takes an object whole
    plt.close(fig)
    paths.write_bytes(path, image.getvalue())
    return path
