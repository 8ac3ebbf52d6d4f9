"""The sweep document (`report/sweep.json`, written atomically) and its figure (`sweep.png`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from probes.steering.choice import PPL_LIMIT


def save_doc(doc: dict, report: Path) -> Path:
    """Write the sweep document atomically to `report/sweep.json`."""
    path = report / "sweep.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.rename(path)
    return path


def plot(doc: dict, path: Path) -> None:
    """Per task: gain vs perplexity ratio of every swept cell, the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(doc["tasks"])
    cols = 3
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    markers = {f: m for f, m in zip(doc["settings"]["fractions"], "os^Dv", strict=False)}
    for ax, task in zip(axes.flat, tasks, strict=False):
        record = doc["tasks"][task]
        cells = [c for c in record["cells"] if c["layer"] is not None]
        keys = sorted({(c["direction"], c["layer"]) for c in cells}, key=lambda k: (k[0] != "paired", k[1]))
        cmap = plt.get_cmap("viridis", max(len(keys), 2))
        for j, key in enumerate(keys):
            mine = sorted((c for c in cells if (c["direction"], c["layer"]) == key), key=lambda c: c["fraction"])
            color = "tab:red" if key[0] == "probe" else cmap(j)
            ax.plot([c["perplexity_ratio"] for c in mine], [c["gain"] for c in mine], color=color, linewidth=1,
                    label=f"{key[0]} L{key[1]}")
            for c in mine:
                ax.scatter(c["perplexity_ratio"], c["gain"], color=color, marker=markers.get(c["fraction"], "o"), s=22)
        for where, color in (("both", "black"), ("last_prompt+generated", "tab:gray")):
            mine = sorted((c for c in record.get("where_check", []) if c["where"] == where), key=lambda c: c["fraction"])
            if mine:
                ax.plot([c["perplexity_ratio"] for c in mine], [c["gain"] for c in mine], color=color, linewidth=1,
                        linestyle="--", label=f"paired L{mine[0]['layer']}, {where}")
                for c in mine:
                    ax.scatter(c["perplexity_ratio"], c["gain"], color=color, marker=markers.get(c["fraction"], "o"),
                               s=22)
        chosen = record.get("chosen")
        if chosen:
            ax.scatter(chosen["perplexity_ratio"], chosen["gain"], s=160, facecolors="none", edgecolors="black")
        ax.axvline(PPL_LIMIT, color="grey", linestyle="--", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.axhline(0.15, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{task} (base {cells[0]['compliance_baseline']:.2f}, n={record['n']})", fontsize=10)
        ax.set_xlabel("perplexity ratio")
        ax.set_ylabel("compliance gain")
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(f"steering sweep on training-split prompts ({doc['model']}); markers: fractions "
                 f"{', '.join(f'{f:g}' for f in markers)} of the layer norm; ring = chosen", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
