"""
Figures: matplotlib without a screen (the Agg backend, chosen in one place) and the plots that
several scripts draw. matplotlib is imported on first use: a script that draws nothing does not pay
for it.
"""

import torch


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, **savefig_kw):
    """Lay out, write and close a figure. A failed write (a full disk) names the figure's path:
    matplotlib's own error does not."""
    if fig.get_layout_engine() is None:  # a figure made with a layout engine (constrained) keeps it
        fig.tight_layout()
    try:
        fig.savefig(path, **savefig_kw)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        pyplot().close(fig)


def plot_energy_curve(energy, path, ranks=(), points=(), title="Energy captured by truncated SVD"):
    """Mean captured energy vs rank (band: ± 1 std over samples); points: [(rank, energy, label)] to
    overlay."""
    plt = pyplot()
    k = torch.arange(1, energy.shape[1] + 1)
    m, s = energy.mean(0), energy.std(0) if len(energy) > 1 else torch.zeros(energy.shape[1])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    ax.plot(k, m, label=f"truncated SVD (mean of {len(energy)})")
    ax.fill_between(k, m - s, (m + s).clamp(max=1), alpha=0.25, label="± 1 std over samples")
    for r in ranks:
        ax.axvline(r, color="grey", lw=0.5, ls=":")
        e = m[min(r, len(m)) - 1].item()
        ax.annotate(
            f"r={r}: {e:.4f}", (r, e), textcoords="offset points", xytext=(3, -12), fontsize=7
        )
    for r, e, label in points:
        ax.plot([r], [e], "o", color="C3", label=label)
    ax.set_xlabel("rank r")
    ax.set_ylabel("captured energy 1 - rel_fro²")
    ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save(fig, path)
