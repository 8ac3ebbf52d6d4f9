"""Compare two probe banks' recorded figures (#20 item 3: a rebuild against the shipped bank), writing JSON.

Per task: the probe's design, layer and thresholds, every held-out column's AUROC and interval, the reliable /
muted verdict, the warning predictor chosen, and the steering each bank records, with whether the shipped
steering gain lies inside the rebuilt sweep's interval for the same cell (layer and alpha).

    python -m benchmarks.bank_compare --shipped steerer/banks/smollm2-135m-instruct --rebuilt /work/bank-repro \
        --sweep /work/bank-repro/reports/steering/sweep.json --out reports/bank_repro/compare.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

COLUMNS = ("test", "heldout_phrasing", "ifeval")
PROBE_KEYS = ("layer", "position", "threshold", "flag_threshold", "reliable")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _probes(manifest: dict) -> dict[str, dict]:
    return {p["task"]: p for p in manifest["probes"]}


def _same(x, y, tol: float = 1e-4) -> bool:
    """Equal, floats to `tol` (features recomputed in other batches differ in the last fp16 bits)."""
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= tol
    return x == y


def _columns(probe: dict) -> dict:
    cols = ((probe.get("reliability") or {}).get("columns") or {})
    return {c: {k: (cols.get(c) or {}).get(k) for k in ("auroc", "ci", "n")} for c in COLUMNS}


def _same_cell(cells: list[dict], steering: dict) -> dict | None:
    """The rebuilt sweep's cell at the shipped steering's layer and alpha, if it measured one."""
    for cell in cells:
        if cell.get("layer") == steering.get("layer") and cell.get("alpha") is not None \
                and steering.get("alpha") is not None and abs(cell["alpha"] - steering["alpha"]) < 1e-3:
            return cell
    return None


def compare(shipped: dict, rebuilt: dict, sweep: dict | None) -> dict:
    a, b = _probes(shipped), _probes(rebuilt)
    out: dict = {}
    for task in a:
        pa, pb = a[task], b.get(task)
        if pb is None:
            out[task] = {"missing_in_rebuilt": True}
            continue
        sa, sb = shipped.get("steering", {}).get(task) or {}, rebuilt.get("steering", {}).get(task) or {}
        cell = _same_cell((sweep or {}).get("tasks", {}).get(task, {}).get("cells", []), sa) if sa else None
        ci = cell.get("gain_ci") if cell else None
        out[task] = {
            "probe_same": {k: _same(pa.get(k), pb.get(k)) for k in PROBE_KEYS}
            | {"design": pa.get("metrics", {}).get("design") == pb.get("metrics", {}).get("design")},
            "columns_shipped": _columns(pa), "columns_rebuilt": _columns(pb),
            "columns_equal": _columns(pa) == _columns(pb),
            "warning": [shipped.get("warning", {}).get("chosen", {}).get(task),
                        rebuilt.get("warning", {}).get("chosen", {}).get(task)],
            "steering_shipped": {k: sa.get(k) for k in ("layer", "alpha", "gain", "perplexity_ratio", "n", "steerable")},
            "steering_rebuilt": {k: sb.get(k) for k in ("layer", "alpha", "gain", "perplexity_ratio", "n", "steerable")},
            "shipped_cell_in_rebuilt_sweep": None if cell is None else {
                "gain": cell.get("gain"), "gain_ci": ci, "perplexity_ratio": cell.get("perplexity_ratio"),
                "shipped_gain_inside": ci is not None and ci[0] <= sa.get("gain", float("nan")) <= ci[1]},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shipped", type=Path, required=True)
    parser.add_argument("--rebuilt", type=Path, required=True)
    parser.add_argument("--sweep", type=Path, default=None, help="the rebuilt build's reports/steering/sweep.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sweep = json.loads(args.sweep.read_text()) if args.sweep else None
    tasks = compare(_manifest(args.shipped), _manifest(args.rebuilt), sweep)
    doc = {"command": shlex.join(["python", "-m", "benchmarks.bank_compare", *(argv or sys.argv[1:])]),
           "shipped": str(args.shipped), "rebuilt": str(args.rebuilt), "tasks": tasks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    for task, t in tasks.items():
        print(f"{task:18s} probe {'same' if all(t['probe_same'].values()) else 'DIFFERS'}  columns "
              f"{'equal' if t['columns_equal'] else 'DIFFER'}  warning {t['warning'][0]}/{t['warning'][1]}  "
              f"shipped steering cell: {t['shipped_cell_in_rebuilt_sweep']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
