"""`steerer ab assign|check|report` (a plug-in of steerer/cli.py, registered under the `steerer.cli` entry points).

Nothing heavy is imported at parser-build time: every `steerer` command builds this parser.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_commands(sub) -> None:
    ab = sub.add_parser("ab", help="A/B experiments on steering: assign keys to arms, check a file, report")
    asub = ab.add_subparsers(dest="ab_command", required=True)
    assign = asub.add_parser("assign", help="the arm of each key (one key per line in, one arm per line out)")
    assign.add_argument("--experiments", required=True, help="experiments file (.json, .yaml)")
    assign.add_argument("--experiment", required=True, help="experiment name")
    assign.add_argument("--keys", required=True, help="file with one experiment key per line; - = stdin")
    assign.set_defaults(handler=cmd_assign)

    check = asub.add_parser("check", help="validate an experiments file and print its experiments")
    check.add_argument("--experiments", required=True)
    check.set_defaults(handler=cmd_check)

    report = asub.add_parser(
        "report",
        help="compliance per arm and task, differences to control, latency, "
        "fluency, sample ratio and the always-valid sequential result",
    )
    report.add_argument("--log", required=True, help="outcome log (SQLite) written by steerer serve")
    report.add_argument(
        "--experiment", default=None, help="experiment name (default: the only one in the log)"
    )
    report.add_argument("--out", default=None, help="folder for report.md, report.json and compliance.png")
    report.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of every interval")
    report.add_argument(
        "--model",
        default=None,
        help="score the responses' perplexity under this unsteered model first (cached in the log); "
        "'default' = the embedded SmolLM2",
    )
    report.add_argument("--threads", type=int, default=None, help="torch threads for --model")
    report.add_argument("--json", action="store_true", help="print the JSON report instead of markdown")
    report.set_defaults(handler=cmd_report)


def _usage(message: str) -> Exception:
    from steerer.cli import UsageError

    return type("AbUsageError", (UsageError, ValueError), {})(message)


def read_keys(path: str) -> list[str]:
    """One key per line; the line ending is not part of the key (trailing spaces are)."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        return [line.rstrip("\r\n") for line in stream]
    finally:
        if stream is not sys.stdin:
            stream.close()


def _load(path: str):
    from steerer.ab.experiments import ExperimentError, load

    try:
        return load(path)
    except ExperimentError as exc:
        raise _usage(str(exc)) from None


def cmd_assign(args: argparse.Namespace) -> int:
    from steerer.ab.experiments import assign

    experiments = _load(args.experiments)
    try:
        experiment = experiments.get(args.experiment)
        keys = read_keys(args.keys)
    except (KeyError, OSError) as exc:
        raise _usage(str(exc).strip("'\"")) from None
    sys.stdout.writelines(f"{assign(experiment, key)}\n" for key in keys)
    sys.stdout.flush()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    experiments = _load(args.experiments)
    for exp in experiments.experiments:
        arms = ", ".join(
            f"{a.name}{' (control)' if a.control else ''} {share:.0%}"
            for a, share in zip(exp.arms, exp.shares.values(), strict=True)
        )
        print(
            f"{exp.name}: {exp.status}, tasks {', '.join(sorted(exp.tasks))}, version {exp.version}; {arms}"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from steerer.ab.analysis import analyse
    from steerer.ab.outcomes import connect
    from steerer.ab.render import to_markdown, write_report

    if not 0 < args.alpha < 1:
        raise _usage("--alpha must be in (0, 1)")
    if not Path(args.log).is_file():
        raise _usage(f"no outcome log at {args.log}")
    db = connect(args.log, readonly=True)
    try:
        fingerprint = None
        if args.model is not None:
            fingerprint = _score(db, args.model, args.threads)
        try:
            report = analyse(db, args.experiment, alpha=args.alpha, perplexity_model=fingerprint)
        except ValueError as exc:
            raise _usage(str(exc)) from None
    finally:
        db.close()
    if args.out:
        paths = write_report(report, args.out)
        print(f"steerer: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    print(
        json.dumps(report.as_dict(), indent=1) if args.json else to_markdown(report),
        end="" if not args.json else "\n",
    )
    return 0


def _score(db, model: str, threads: int | None) -> str:
    """Fill the log's perplexity cache for `model`; returns its fingerprint."""
    from steerer.ab.fluency import fill_perplexity
    from steerer.model import load_model

    lm = load_model(None if model == "default" else model, threads=threads)
    n = fill_perplexity(db, lm)
    print(f"steerer: scored {n} new responses under {lm.name} ({lm.fingerprint})", file=sys.stderr)
    return lm.fingerprint
