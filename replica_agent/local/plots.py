"""PNG plots of local-mode runs (matplotlib, Agg backend): one line or bar group per run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def write_plots(results: list[dict], out: Path) -> dict[str, str]:
    """goodput and SLO attainment over time, held-out loss and adapter freshness per round."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    def save(name: str, fig) -> None:
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths[name] = str(path)

    for name, key, label in (("goodput", "goodput_per_s", "goodput (SLO-met req/s x Q)"), ("slo_attainment", "slo_attainment", "SLO attainment")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for r in results:
            ax.plot([w["t"] for w in r["windows"]], [w[key] for w in r["windows"]], marker="o", label=r["policy"])
        ax.set_xlabel("seconds into the trace")
        ax.set_ylabel(label)
        ax.legend()
        save(name, fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in results:
        rounds = [x for x in r["rounds"] if x["result"] == "Succeeded"]
        xs = [0] + [x["number"] for x in rounds]
        ax.plot(xs, [r["held_out_loss_initial"]] + [x["held_out_loss"] for x in rounds], marker="o", label=f"{r['policy']} (all replicas' held-out data)")
    ax.set_xlabel("federated round (0 = initial adapter)")
    ax.set_ylabel("held-out eval loss")
    ax.legend()
    save("eval_loss", fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        rounds = [x for x in r["rounds"] if x["result"] == "Succeeded"]
        ax.bar([x["number"] + i * width for x in rounds], [x["freshness_s"] for x in rounds], width=width, label=r["policy"])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target 1 s")
    ax.set_xlabel("federated round")
    ax.set_ylabel("adapter freshness (s)")
    ax.legend()
    save("freshness", fig)
    return paths
