"""PNG plots of local-mode runs (matplotlib, Agg backend): one line or bar group per run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def write_plots(results: list[dict], out: Path) -> dict[str, str]:
    """goodput, SLO attainment and per-request quality over time, the quality CDF, adapter freshness per round."""
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
        windows = [w for w in r["windows"] if w["mean_quality"] is not None]  # windows without an answered request have no Q
        line = ax.plot([w["t"] for w in windows], [w["mean_quality"] for w in windows], marker="o", label=f"{r['policy']}: as served")[0]
        ax.plot(
            [w["t"] for w in windows],
            [w["mean_quality_initial"] for w in windows],
            linestyle=":",
            color=line.get_color(),
            label=f"{r['policy']}: initial adapter",
        )
    ax.set_xlabel("seconds into the trace")
    ax.set_ylabel("Q per request (1 / cross-entropy)")
    ax.legend(fontsize="small")
    save("quality_over_time", fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in results:
        cdf = r["quality_cdf"]
        ax.plot(cdf["levels"], cdf["share_at_or_above"], marker=".", label=r["policy"])
    ax.set_xlabel("quality level Q")
    ax.set_ylabel("share of requests at or above")
    ax.legend()
    save("quality_cdf", fig)

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


def write_load_plot(loads: list[float], runs_by_load: list[list[dict]], out: Path) -> str:
    """Goodput per second against the offered load (a fraction of measured capacity), one line per policy."""
    out.mkdir(parents=True, exist_ok=True)
    policies = [r["policy"] for r in runs_by_load[0]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for policy in policies:
        ax.plot(loads, [next(r["goodput_per_s"] for r in runs if r["policy"] == policy) for runs in runs_by_load], marker="o", label=policy)
    ax.set_xlabel("offered load (fraction of the cluster's measured capacity within the SLO)")
    ax.set_ylabel("goodput per second")
    ax.legend()
    path = out / "goodput_vs_load.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
