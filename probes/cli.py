"""`steerer verify` and `steerer probes build|corpus|train|list|report|score` (a plug-in of steerer/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_commands(sub) -> None:
    verify = sub.add_parser("verify", help="check responses against their constraints (jsonl in, jsonl out)")
    verify.add_argument("--input", required=True, help="rows {id, task, params, response}; - = stdin")
    verify.add_argument("--output", required=True, help="rows {id, satisfied} or {id, error}; - = stdout")
    verify.set_defaults(handler=cmd_verify)

    probes = sub.add_parser("probes", help="build the probe dataset, train banks, run the paper's experiments")
    psub = probes.add_subparsers(dest="probes_command", required=True)
    build = psub.add_parser("build", help="on-policy responses + residuals of every layer (resumable)")
    build.add_argument("--out", default=str(REPO / "data" / "probe_dataset"))
    build.add_argument("--model", default=None)
    build.add_argument("--tasks", default=None, help="comma-separated task ids (default: all nine)")
    build.add_argument("--prompts-per-task", type=int, default=120)
    build.add_argument("--samples", type=int, default=None,
                       help="sampled responses per prompt (default: 2 for structural tasks, 1 for the others)")
    build.add_argument("--max-new-tokens", type=int, default=160, help="token budget of the length tasks")
    build.add_argument("--max-new-tokens-other", type=int, default=112, help="token budget of the other tasks")
    build.add_argument("--layers", default=None, help="comma-separated layers to store (default: all)")
    build.add_argument("--token-layers", default=None, help="layers stored at every token (default: every 3rd)")
    build.add_argument("--batch-size", type=int, default=48)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    build.set_defaults(handler=cmd_build)

    train = psub.add_parser("train", help="train specialist + general probes and write a probe bank")
    train.add_argument("--dataset", default=str(REPO / "data" / "probe_dataset"))
    train.add_argument("--out", default=None, help="bank folder (default: the shipped default bank)")
    train.add_argument("--position", default="auto", choices=["auto", "eos", "tokens"],
                       help="bank probes trained on the EOS residual, on every 3rd generated token, or per task "
                            "whichever flags more training violations at the false-flag budget (auto)")
    train.add_argument("--tasks", default=None)
    train.add_argument("--report", default=None, help="also write the paper's experiments to this folder")
    train.set_defaults(handler=cmd_train)

    report = psub.add_parser("report", help="the paper's experiments: JSON + PNG + README")
    report.add_argument("--dataset", default=str(REPO / "data" / "probe_dataset"))
    report.add_argument("--out", default=str(REPO / "reports" / "paper"))
    report.add_argument("--tasks", default=None)
    report.set_defaults(handler=cmd_report)

    listing = psub.add_parser("list", help="a bank's probes: layer, thresholds, test AUROC with its 95%% interval, "
                                           "reliability")
    listing.add_argument("--bank", default=None, help="bank folder (default: the shipped bank)")
    listing.set_defaults(handler=cmd_list)

    corpus = psub.add_parser("corpus", help="text-only probe corpus: many phrasings per task, checker labels and "
                                            "violation onsets, class-balanced by rounds (resumable)")
    corpus.add_argument("--out", default=None, help="folder (default: probes/corpora/{model})")
    corpus.add_argument("--model", default=None)
    corpus.add_argument("--tasks", default=None, help="comma-separated task ids (default: all nine)")
    corpus.add_argument("--per-task", type=int, default=640, help="kept responses per task")
    corpus.add_argument("--batch-size", type=int, default=48, help="rows decoding together")
    corpus.add_argument("--round-size", type=int, default=48, help="responses per task per round")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--max-rounds", type=int, default=None, help="stop after this many rounds (resume later)")
    corpus.add_argument("--max-new-tokens", type=int, default=160, help="token budget of the length tasks")
    corpus.add_argument("--max-new-tokens-other", type=int, default=112, help="token budget of the other tasks")
    corpus.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    corpus.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    corpus.set_defaults(handler=cmd_corpus)

    score = psub.add_parser("score", help="generate for your prompts and score them with the bank")
    score.add_argument("--input", required=True, help="rows {id, prompt, task, params}")
    score.add_argument("--output", required=True)
    score.add_argument("--bank", default=None)
    score.add_argument("--model", default=None)
    score.add_argument("--max-new-tokens", type=int, default=128)
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    score.set_defaults(handler=cmd_score)


def _tasks(text: str | None) -> list[str] | None:
    if not text:
        return None
    from probes.tasks import get_task

    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        get_task(name)
    return names


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    from steerer.cli import UsageError, parse_layers

    try:
        return parse_layers(text) or None
    except UsageError as exc:
        raise UsageError(str(exc).replace("--layers", flag)) from exc


def cmd_verify(args: argparse.Namespace) -> int:
    from probes.verify import verify_file

    if args.input != "-" and not Path(args.input).is_file():
        raise FileNotFoundError(f"input file not found: {args.input}")
    ok, bad = verify_file(args.input, args.output)
    import sys

    print(f"verified {ok} rows, {bad} errors", file=sys.stderr)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from probes.dataset import BuildConfig, build
    from probes.tasks import TASKS
    from steerer.model import load_model

    config = BuildConfig(tasks=tuple(_tasks(args.tasks) or TASKS), prompts_per_task=args.prompts_per_task,
                         samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                         max_new_tokens_other=args.max_new_tokens_other,
                         layers=_ints(args.layers, "--layers"), token_layers=_ints(args.token_layers, "--token-layers"),
                         batch_size=args.batch_size, seed=args.seed)
    manifest = build(load_model(args.model, device=args.device), Path(args.out), config)
    for task, info in manifest["tasks"].items():
        print(f"{task:18s} n={info['n']:4d} compliance={info['compliance_rate']:.2f} "
              f"train/test={info['n_train']}/{info['n_test']} by aid={info['compliance_by_aid']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from probes.train import make_bank, train_all
    from steerer.bank import DEFAULT_BANK

    manifest, trained, general, datas = train_all(Path(args.dataset), _tasks(args.tasks))
    version = f"{manifest['fingerprint']}-{args.position}-{len(trained)}t"
    bank = make_bank(manifest, trained, datas, args.position, version)
    bank.extra = {"dataset": {k: manifest[k] for k in ("config", "split_seed")},
                  "general_probe_layer": general["best_layer"]}
    out = bank.save(args.out or DEFAULT_BANK)
    _print_probes(bank)
    print(f"wrote {out}")
    if args.report:
        from probes.report import write_report

        write_report(Path(args.report), manifest["model"], trained, general, datas, manifest["layers"],
                     {"version": version, "path": str(out)})
        print(f"wrote {args.report}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from steerer.bank import ProbeBank

    bank = ProbeBank.load(args.bank)
    print(f"bank {bank.version} for {bank.model} ({bank.fingerprint}), {len(bank.probes)} probes")
    _print_probes(bank)
    return 0


def _print_probes(bank) -> None:
    """One line per probe with its held-out quality, then the ones a server mutes by default."""
    for probe in bank.probes:
        m = probe.metrics
        fmt = lambda key, spec, m=m: "n/a" if m.get(key) is None else format(m[key], spec)  # noqa: E731
        flag = probe.threshold if probe.flag_threshold is None else probe.flag_threshold
        ci = "[n/a]" if probe.auroc_ci is None else f"[{probe.auroc_ci[0]:.2f}, {probe.auroc_ci[1]:.2f}]"
        state = {True: "reliable", False: "UNRELIABLE", None: "reliability unknown"}[probe.reliable]
        print(f"{probe.task:18s} layer {probe.layer:2d} {probe.method:8s} threshold {probe.threshold:.3f} "
              f"flag {flag:.3f}  test AUROC {fmt('test_auroc', '.3f')} {ci} n={fmt('n_test', 'd')} "
              f"acc {fmt('test_accuracy', '.3f')}  false flags {fmt('test_false_flag_rate', '.2f')} "
              f"violations flagged {fmt('test_violations_flagged', '.2f')}  {state}")
    if bank.unreliable:
        print(f"muted when served (95% test-AUROC interval reaches chance, or not measured; "
              f"--use-unreliable-probes overrides): {', '.join(bank.unreliable)}")


def cmd_report(args: argparse.Namespace) -> int:
    from probes.report import write_report
    from probes.train import train_all

    manifest, trained, general, datas = train_all(Path(args.dataset), _tasks(args.tasks))
    write_report(Path(args.out), manifest["model"], trained, general, datas, manifest["layers"])
    print(f"wrote {args.out}")
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from probes.corpus import CorpusConfig, build_corpus, default_out
    from probes.tasks import TASKS
    from steerer.model import load_model

    for flag in ("per_task", "batch_size", "round_size", "max_new_tokens", "max_new_tokens_other"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    config = CorpusConfig(tasks=tuple(_tasks(args.tasks) or TASKS), per_task=args.per_task,
                          batch_size=args.batch_size, round_size=args.round_size, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, max_new_tokens_other=args.max_new_tokens_other,
                          max_rounds=args.max_rounds)
    lm = load_model(args.model, threads=args.threads, device=args.device)
    out = Path(args.out) if args.out else default_out(lm.name)
    command = shlex.join(["steerer", *sys.argv[1:]])
    manifest = build_corpus(lm, out, config, command=command)
    for task, info in manifest["tasks"].items():
        print(f"{task:18s} n={info['n']:4d} satisfied={info['satisfied']:4d} violated={info['violated']:4d} "
              f"generated={info['generated']:5d} discarded={info['discarded']:4d} "
              f"{'complete' if info['complete'] else 'INCOMPLETE'}")
    print(f"wrote {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from probes.scoring import score_file

    if not Path(args.input).is_file():
        raise FileNotFoundError(f"input file not found: {args.input}")
    ok, bad = score_file(args.input, args.output, args.bank, args.model, args.max_new_tokens, args.batch_size,
                         device=args.device)
    import sys

    print(f"scored {ok} rows, {bad} errors", file=sys.stderr)
    return 0
