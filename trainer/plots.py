"""Calibration plots of an evaluation: reliability diagrams (per adapter, and per field when a
task has several) and one accuracy-vs-coverage plot for all adapters. PNGs via matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path


def plot(reports: dict[str, dict], out_dir: Path, tag: str) -> list[str]:
    """Reliability diagram per adapter and one accuracy-coverage plot for all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rep in reports.items():
        diagrams = [("", rep["reliability"], rep["ece"])]
        if len(rep.get("fields", {})) > 1:  # several fields: one diagram per field too
            diagrams += [(f"-{field}", f["reliability"], f["ece"]) for field, f in rep["fields"].items()
                         if "reliability" in f]
        for suffix, bins, ece in diagrams:
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            bins = [b for b in bins if b["count"]]
            ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins],
                   width=1 / 15, edgecolor="black", alpha=0.7, label="accuracy")
            ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
            ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
                   title=f"{name}{suffix} on {rep['data']['name']} (ECE {ece:.3f})")
            ax.legend(loc="upper left", fontsize=8)
            path = out_dir / f"{tag}-{name}{suffix}-reliability.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(str(path))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, rep in reports.items():
        curve = rep["coverage_curve"]
        ax.plot(curve["coverage"], curve["accuracy"], label=f"{name} (acc {rep['accuracy']:.3f})")
        ax.plot([rep["coverage_at_epsilon"]], [1 - rep["epsilon"]], "o")
    eps = next(iter(reports.values()))["epsilon"]
    ax.axhline(1 - eps, color="grey", ls=":", lw=1, label=f"target error {eps:.0%}")
    ax.set(xlabel="coverage (share answered by the student)", ylabel="accuracy of answered",
           xlim=(0, 1), ylim=(0, 1.01), title=f"accuracy vs coverage ({tag})")
    ax.legend(fontsize=8)
    path = out_dir / f"{tag}-coverage.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths + [str(path)]
