"""`steerer verify` and `steerer probes corpus|ifeval|build|train|steer|warn|reliability|list|score|ranges` (a plug-in of steerer/cli.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_commands(sub) -> None:
    from probes.bank_build import add_commands as add_bank_commands

    add_bank_commands(sub)  # `steerer bank build`
    verify = sub.add_parser("verify", help="check responses against their constraints (jsonl in, jsonl out)")
    verify.add_argument("--input", required=True, help="rows {id, task, params, response}; - = stdin")
    verify.add_argument("--output", required=True, help="rows {id, satisfied} or {id, error}; - = stdout")
    verify.set_defaults(handler=cmd_verify)

    probes = sub.add_parser("probes", help="build the probe dataset, train banks, run the paper's experiments")
    psub = probes.add_subparsers(dest="probes_command", required=True)
    build = psub.add_parser("build", help="activations of the committed corpus by teacher forcing (incremental); "
                                          "`steerer probes corpus` generates the corpus itself")
    build.add_argument("--corpus", default=None, help="corpus folder (default: probes/corpora/{model})")
    build.add_argument("--features", default=None, help="cache folder (default: data/features/{model})")
    build.add_argument("--model", default=None)
    build.add_argument("--tasks", default=None, help="comma-separated task ids (default: all nine)")
    build.add_argument("--token-layers", default=None, help="layers kept at every token (default: every 3rd + last)")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    build.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    build.set_defaults(handler=cmd_build)

    train = psub.add_parser("train", help="choose, measure and bank one probe per task from the corpus and its "
                                          "features; optionally the paper's report")
    _data_arguments(train)
    train.add_argument("--out", default=None, help="bank folder (default: the shipped default bank)")
    train.add_argument("--tasks", default=None)
    train.add_argument("--report", default=None, help="also write the paper's experiments to this folder")
    train.add_argument("--steering-from", default=None,
                       help="keep each task's steering layer and direction from this bank (one whose steering "
                            "efficacy was measured) instead of the corpus's class mean difference")
    train.set_defaults(handler=cmd_train)

    warn = psub.add_parser("warn", help="token-level warning predictors (forecasts from the tokens before a "
                                        "violation, reading progress towards a limit) chosen per task against the "
                                        "bank's probe on training data; writes them into the bank's warning/ folder")
    _data_arguments(warn)
    warn.add_argument("--bank", default=None, help="bank to add them to (default: the shipped default bank)")
    warn.add_argument("--out", default=None, help="bank folder to write (default: --bank)")
    warn.add_argument("--tasks", default=None, help="tasks to fit (default: all; others keep their probe)")
    warn.add_argument("--layers", default=None, help="candidate token layers (default: every 6th + the probe's)")
    warn.add_argument("--report", default="reports/warning", help="folder for warning.json (measured per split)")
    warn.set_defaults(handler=cmd_warn)

    forecast = psub.add_parser("forecast", help="term_exclusion's warning: a forecast from the running mean of the "
                                                "forbidden words' logit lens (no warm-up), chosen on the training "
                                                "split; replaces its predictor in the bank's warning/")
    forecast.add_argument("--corpus", default=None, help="corpus folder (default: the default model's)")
    forecast.add_argument("--bank", default=None, help="bank to add it to (default: the shipped default bank)")
    forecast.add_argument("--out", default=None, help="bank folder to write (default: --bank)")
    forecast.add_argument("--layers", default="9,12,15", help="candidate layers")
    forecast.add_argument("--splits", default="test,heldout_phrasing,ifeval",
                          help="held-out splits to measure (teacher forced; empty: none)")
    forecast.add_argument("--cache", default=None, help="an .npz keeping the lens readings (reruns skip the rows "
                                                        "it holds)")
    forecast.add_argument("--report", default="reports/warning", help="folder for forecast.json")
    forecast.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    forecast.set_defaults(handler=cmd_forecast)

    steer = psub.add_parser("steer", help="steering directions (compliant minus violating, same request), layers and "
                                          "strengths chosen by an efficacy sweep on training-split prompts; "
                                          "writes a bank and the sweep's report")
    steer.add_argument("--bank", default=None, help="source bank (default: the shipped bank); its probes are kept")
    steer.add_argument("--out", required=True, help="bank folder to write (the source bank is never overwritten)")
    _data_arguments(steer)
    steer.add_argument("--tasks", default=None, help="comma-separated task ids (default: every task in the bank)")
    steer.add_argument("--layers", default="6,12,18,24", help="candidate steering layers (token layers of the "
                                                              "features)")
    steer.add_argument("--fractions", default="0.08,0.16,0.32", help="alpha as fractions of the layer's mean "
                                                                     "residual norm")
    steer.add_argument("--n", type=int, default=20, help="training-split prompts per task")
    steer.add_argument("--max-new-tokens", type=int, default=96)
    steer.add_argument("--length-max-new-tokens", type=int, default=160, help="token budget of the count tasks")
    steer.add_argument("--no-probe-comparison", action="store_true",
                       help="do not also sweep the source bank's direction at its steering layer")
    steer.add_argument("--where-tasks", default="lowercase",
                       help="tasks whose chosen cell is also run steering the prompt (Where.BOTH) and its last "
                            "token ('' for none)")
    steer.add_argument("--gate-thresholds", default="0.3,0.6,0.9",
                       help="P(satisfied) gate thresholds tried for conditional steering at the chosen alpha ('' to "
                            "skip); the one gaining most at perplexity ratio <= 1.10 goes into the bank")
    steer.add_argument("--gate-min-gain", type=float, default=0.1,
                       help="calibrate the gate only for tasks whose chosen constant cell gained at least this")
    steer.add_argument("--report", default=str(REPO / "reports" / "steering"), help="sweep JSON and plot folder")
    steer.add_argument("--fresh", action="store_true", help="sweep every task again (default: tasks already in "
                                                            "the report are kept, with the settings they record)")
    steer.add_argument("--seed", type=int, default=0)
    steer.add_argument("--max-batch", type=int, default=192)
    steer.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    steer.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    steer.set_defaults(handler=cmd_steer)

    rel = psub.add_parser("reliability", help="measure the bank's probes on IFEval (teacher-forced, the bank's own "
                          "probe) and rewrite every probe's reliability: which held-out column failed, and the "
                          "parameter range it holds within (manifest only)")
    rel.add_argument("--bank", default=None, help="bank folder (default: the shipped bank)")
    rel.add_argument("--out", default=None, help="bank folder to write (default: --bank)")
    rel.add_argument("--corpus", default=None, help="corpus folder with eval/ifeval.jsonl.gz (default: the bank's)")
    rel.add_argument("--report", default=str(REPO / "reports" / "reliability"), help="folder for reliability.json")
    rel.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    rel.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    rel.set_defaults(handler=cmd_reliability)

    keep = psub.add_parser("keep-steering", help="a bank with new probes and another bank's measured steering "
                           "(layer, direction, gate threshold, the sweep's records): swap retrained probes into a "
                           "bank without re-running its steering sweep")
    keep.add_argument("--bank", required=True, help="bank with the new probes (e.g. a build's build/bank-warnings)")
    keep.add_argument("--steering-from", required=True, help="bank whose steering efficacy was measured")
    keep.add_argument("--out", required=True, help="bank folder to write")
    keep.add_argument("--corpus", default=None, help="record this corpus folder as the probes' corpus (the one a "
                      "build was given, rather than the build's copy)")
    keep.set_defaults(handler=cmd_keep_steering)

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
    corpus.add_argument("--ranges", choices=("default", "ifeval"), default="default",
                        help="ifeval: IFEval's ranges (word limits 50-800, 1-3 instructions, word lists) for "
                             "word_count, term_exclusion, keyword_inclusion, in probes/corpora/{model}-ifeval")
    corpus.add_argument("--relabel", action="store_true",
                        help="generate nothing: recompute every row's label and violation onset with today's rules")
    corpus.add_argument("--engine", default="auto", choices=("auto", "hf", "vllm"),
                        help="generator: transformers loop (hf) or vLLM; auto = vllm where it imports, else hf")
    corpus.set_defaults(handler=cmd_corpus)

    ifeval = psub.add_parser("ifeval", help="answer IFEval's prompts that map onto the tasks (evaluation only) and "
                                            "store the labelled responses beside the corpus")
    ifeval.add_argument("--corpus", default=None, help="corpus folder (default: probes/corpora/{model})")
    ifeval.add_argument("--model", default=None)
    ifeval.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ifeval.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ifeval.set_defaults(handler=cmd_ifeval)

    score = psub.add_parser("score", help="generate for your prompts and score them with the bank")
    score.add_argument("--input", required=True, help="rows {id, prompt, task, params}")
    score.add_argument("--output", required=True)
    score.add_argument("--bank", default=None)
    score.add_argument("--model", default=None)
    score.add_argument("--max-new-tokens", type=int, default=128)
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    score.set_defaults(handler=cmd_score)

    ranges = psub.add_parser("ranges", help="retrain word_count, term_exclusion, keyword_inclusion on the corpus's "
                                            "training split plus the IFEval-range corpus's; measure shipped vs "
                                            "retrained side by side (IFEval evaluation only); a candidate bank")
    ranges.add_argument("--corpus", default=str(REPO / "probes/corpora/smollm2-135m-instruct"))
    ranges.add_argument("--features", required=True, help="features of --corpus (`steerer probes build`)")
    ranges.add_argument("--range-corpus", default=str(REPO / "probes/corpora/smollm2-135m-instruct-ifeval"))
    ranges.add_argument("--range-features", required=True, help="features of --range-corpus")
    ranges.add_argument("--bank", default=None, help="the bank to compare with (default: the shipped bank)")
    ranges.add_argument("--tasks", default="word_count,term_exclusion,keyword_inclusion")
    ranges.add_argument("--out", default=None, help="candidate bank folder (written only when a task passes)")
    ranges.add_argument("--report", default=str(REPO / "reports/ifeval_ranges/ifeval_ranges.json"))
    ranges.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ranges.set_defaults(handler=cmd_ranges)


def _data_arguments(parser) -> None:
    """--corpus and --features, as every command reading the committed corpus and its features takes them."""
    parser.add_argument("--corpus", default=None, help="corpus folder (default: the default model's)")
    parser.add_argument("--features", default=None, help="features cache (default: data/features/{model})")


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
    from probes import ifeval
    from probes.corpus import default_out, load_corpus
    from probes.features import default_features, featurise
    from probes.tasks import TASKS
    from steerer.model import load_model

    lm = load_model(args.model, threads=args.threads, device=args.device)
    corpus = Path(args.corpus) if args.corpus else default_out(lm.name)
    if not (corpus / "manifest.json").exists():
        raise FileNotFoundError(f"no corpus at {corpus}: generate it with `steerer probes corpus`")
    rows = {t: load_corpus(corpus, t) for t in (_tasks(args.tasks) or TASKS)}
    if (corpus / ifeval.FILE).exists():  # the out-of-distribution evaluation set, featurised like the corpus
        rows[ifeval.TASK] = ifeval.load(corpus)
    out = Path(args.features) if args.features else default_features(lm.name)
    featurise(lm, {t: r for t, r in rows.items() if r}, out, _ints(args.token_layers, "--token-layers"))
    print(f"features of {sum(len(r) for r in rows.values())} responses in {out}")
    return 0


def _corpus_and_features(args) -> tuple[Path, Path, dict]:
    from probes.corpus import CORPORA
    from probes.features import default_features

    corpus = Path(args.corpus) if args.corpus else CORPORA / "smollm2-135m-instruct"
    if not (corpus / "manifest.json").exists():
        raise FileNotFoundError(f"no corpus at {corpus}: generate it with `steerer probes corpus`")
    model = json.loads((corpus / "manifest.json").read_text())["model"]
    features = Path(args.features) if args.features else default_features(model)
    if not (features / "manifest.json").exists():
        raise FileNotFoundError(f"no features at {features}: compute them with `steerer probes build`")
    return corpus, features, json.loads((features / "manifest.json").read_text())


def cmd_train(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from probes import evaluation, pipeline
    from probes.tasks import TASKS
    from probes.train import train_all_layers
    from steerer.bank import DEFAULT_BANK, ProbeBank, content_version, keep_steering
    from steerer.lens import LensWeights
    from steerer.model import load_model
    from steerer.monitor import MonitorConfig

    corpus, features, fmanifest = _corpus_and_features(args)
    tasks = _tasks(args.tasks) or list(TASKS)
    lm = load_model(fmanifest["model"])  # its final norm and unembedding: the lens inputs of lexical probes
    if lm.fingerprint != fmanifest["fingerprint"]:
        raise ValueError(f"features in {features} are of another model ({fmanifest['fingerprint']})")
    datas, results = pipeline.train_corpus(corpus, features, tasks, fmanifest["token_layers"],
                                           (LensWeights.of(lm.model), lm.tokenizer))
    entries = [evaluation.bank_entry(t, results[t]["probe"], datas[t], fmanifest["hidden_size"],
                                     fmanifest["token_layers"], results[t]["measured"], MonitorConfig()) for t in tasks]
    summary = pipeline.generalisation_summary(results)
    extra = {"corpus": str(corpus.relative_to(REPO)) if corpus.is_relative_to(REPO) else str(corpus),
             "command": shlex.join(["steerer", *sys.argv[1:]]),
             "generalisation": {t: {k: (g[k] or {}).get("auroc") for k in ("test", "heldout_phrasing", "ifeval")}
                                for t, g in summary.items()}}
    bank = evaluation.assemble_bank(entries, fmanifest["model"], fmanifest["fingerprint"], fmanifest["hidden_size"],
                                    "pending", extra)
    if args.steering_from:
        bank = keep_steering(bank, ProbeBank.load(args.steering_from))
    bank.version = content_version(bank)
    out = bank.save(args.out or DEFAULT_BANK)
    _print_probes(bank)
    print(f"wrote {out}")
    if args.report:
        from probes.report import write_report

        trained, general = train_all_layers(datas, fmanifest["layers"])
        write_report(Path(args.report), fmanifest["model"], trained, general, datas, fmanifest["layers"],
                     {"version": bank.version, "path": str(out)}, summary)
        print(f"wrote {args.report}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from probes import steering
    from steerer.bank import DEFAULT_BANK, ProbeBank, content_version
    from steerer.model import load_model

    corpus, features, fmanifest = _corpus_and_features(args)
    source = ProbeBank.load(args.bank)
    out = Path(args.out).resolve()
    if out == Path(args.bank or DEFAULT_BANK).resolve():
        raise ValueError("--out must not be the source bank: write the steered bank to a folder of its own")
    tasks = _tasks(args.tasks) or list(source.tasks)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not fractions or any(not 0 < f <= 2 for f in fractions) or args.n < 1:
        raise ValueError("--fractions must be numbers in (0, 2] and --n >= 1")
    lm = load_model(fmanifest["model"], threads=args.threads, device=args.device)
    if lm.fingerprint != fmanifest["fingerprint"]:
        raise ValueError(f"features in {features} are of another model ({fmanifest['fingerprint']})")
    source.check_model(lm.fingerprint, lm.hidden_size)
    command = shlex.join(["steerer", *sys.argv[1:]])
    config = steering.SweepConfig(
        tasks=tasks, layers=_ints(args.layers, "--layers"), fractions=fractions, n=args.n, seed=args.seed,
        max_new_tokens=args.max_new_tokens, length_max_new_tokens=args.length_max_new_tokens,
        compare_probe=not args.no_probe_comparison,
        where_tasks=tuple(t for t in args.where_tasks.split(",") if t.strip()), max_batch=args.max_batch,
        extra={"command": command})
    report = Path(args.report)
    doc, directions = steering.run(lm, source, corpus, features, config, report, fresh=args.fresh)
    choices = {t: steering.choice_record(doc["tasks"][t]) for t in directions}
    bank = steering.steered_bank(source, choices, directions)
    bank = steering.without_looping_steering(bank, doc)  # loops only: steering off
    thresholds = [float(g) for g in args.gate_thresholds.split(",") if g.strip()]
    gate_tasks = [t for t, c in choices.items() if c["gain"] >= args.gate_min_gain]
    if thresholds and gate_tasks and steering.gate_supported():
        key = {"thresholds": thresholds, "tasks": gate_tasks}
        if (doc.get("gate") or {}).get("key") != key:
            doc["gate"] = {"key": key, "tasks": steering.calibrate_gates(lm, bank, doc, gate_tasks, thresholds, config)}
            steering.save_doc(doc, report)
        picks = {t: r["chosen"] for t, r in doc["gate"]["tasks"].items() if r["chosen"] is not None}
        bank = steering.with_gate_thresholds(bank, picks)
        for t, r in doc["gate"]["tasks"].items():
            bank.extra["steering"][t]["gate_threshold"] = r["chosen"]
            bank.extra["steering"][t]["gate_source"] = (
                f"conditional at the chosen alpha, gate thresholds {thresholds} on the sweep's prompts: the largest "
                "gain at perplexity ratio <= 1.10" + ("" if r["chosen"] is not None else "; none gained, so the flag "
                                                           "threshold gates"))
    elif thresholds:
        print("steerer: gate thresholds not calibrated (" + ("the runtime has no Probe.gate_threshold" if gate_tasks
              and not steering.gate_supported() else "no task gained enough") + ")")
    kept = [t for t in tasks if t not in directions]
    bank.extra["steering_sweep"] = {"command": command, "report": str(report), "source_bank": source.version,
                                    "kept_source_steering": kept}
    bank.version = content_version(bank)
    bank.save(out)
    doc["bank"] = {"path": str(out), "version": bank.version}
    steering.save_doc(doc, report)
    steering.plot(doc, report / "sweep.png")
    for task in tasks:
        c = choices.get(task)
        print(f"{task:18s} " + ("no swept cell gained at perplexity ratio <= 1.10: source steering kept" if c is None
                                else f"layer {c['layer']:2d} alpha {c['alpha']:7.2f} (fraction {c['fraction']:g}) "
                                     f"gain {c['gain']:+.2f} perplexity ratio {c['perplexity_ratio']:.3f} n={c['n']}"
                                     f" gate {c.get('gate_threshold')}"))
    print(f"wrote {out}, {report / 'sweep.json'} and {report / 'sweep.png'}")
    return 0


def cmd_warn(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from probes.tasks import TASKS
    from probes.warning import train_warnings, write_report
    from steerer.bank import DEFAULT_BANK, ProbeBank, content_version
    from steerer.lens import LensWeights
    from steerer.model import load_model

    corpus, features, fmanifest = _corpus_and_features(args)
    bank = ProbeBank.load(args.bank)
    tasks = _tasks(args.tasks) or [t for t in TASKS if t in bank.tasks]
    token_layers = fmanifest["token_layers"]
    layers = list(_ints(args.layers, "--layers") or token_layers[1::2])
    if missing := [layer for layer in layers if layer not in token_layers]:
        raise ValueError(f"--layers {missing} are not token layers of the features ({token_layers})")
    lm = load_model(fmanifest["model"])
    if lm.fingerprint != fmanifest["fingerprint"] or bank.fingerprint != lm.fingerprint:
        raise ValueError("the bank, the features and the model must be of one model")
    warned, report = train_warnings(corpus, features, bank, tasks, token_layers, layers, LensWeights.of(lm.model),
                                    lm.tokenizer)
    warned.extra = warned.extra | {"warning": {"command": shlex.join(["steerer", *sys.argv[1:]]),
                                               "chosen": {t: r["chosen"]["kind"] for t, r in report.items()}}}
    warned.version = content_version(warned)
    out = warned.save(args.out or args.bank or DEFAULT_BANK)
    folder = Path(args.report)
    write_report(folder, report, warned.version, warned.extra["warning"]["command"])
    for task, r in report.items():
        w, e = r["measured"]["warning"], r["measured"]["end_probe"]
        print(f"{task:18s} {r['chosen']['kind']:9s} layer {r['chosen']['layer']:2d}  "
              + "  ".join(f"{split}: early {m[split]['flagged_at_least_3_early']} false {m[split]['false_flag_rate']}"
                          for m in (w,) for split in ("test", "heldout_phrasing"))
              + f"  | end probe test early {e['test']['flagged_at_least_3_early']} false {e['test']['false_flag_rate']}")
    print(f"wrote {out} and {folder / 'warning.json'}")
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from probes.corpus import CORPORA
    from probes.forecast import train_forecast
    from steerer.bank import DEFAULT_BANK, ProbeBank, content_version
    from steerer.model import load_model

    splits = tuple(s for s in args.splits.split(",") if s)
    if bad := [s for s in splits if s not in ("test", "heldout_phrasing", "ifeval")]:
        raise ValueError(f"--splits {bad}: the held-out splits are test, heldout_phrasing and ifeval")
    corpus = Path(args.corpus) if args.corpus else CORPORA / "smollm2-135m-instruct"
    if not (corpus / "manifest.json").exists():
        raise FileNotFoundError(f"no corpus at {corpus}: generate it with `steerer probes corpus`")
    bank = ProbeBank.load(args.bank)
    lm = load_model(json.loads((corpus / "manifest.json").read_text())["model"], threads=args.threads)
    if lm.fingerprint != bank.fingerprint:
        raise ValueError("the bank and the corpus must be of one model")
    layers = list(_ints(args.layers, "--layers"))
    if bad := [layer for layer in layers if not 0 <= layer < lm.num_layers]:
        raise ValueError(f"--layers {bad} outside the model's {lm.num_layers} layers")
    command = shlex.join(["steerer", *sys.argv[1:]])
    warned, report = train_forecast(lm, corpus, bank, layers, cache=Path(args.cache) if args.cache else None,
                                    splits=splits)
    warned.extra["warning"]["forecast_command"] = command
    warned.version = content_version(warned)
    out = warned.save(args.out or args.bank or DEFAULT_BANK)
    folder = Path(args.report)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "forecast.json").write_text(json.dumps({"bank_version": warned.version, "command": command,
                                                      **report}, indent=1))
    chosen = report["chosen"]
    print(f"term_exclusion forecast: layer {chosen['layer']} threshold {chosen['threshold']} train early "
          f"{chosen['flagged_at_least_3_early']} false {chosen['false_flag_rate']}  "
          + "  ".join(f"{split}: early {m['flagged_at_least_3_early']} false {m['false_flag_rate']}"
                      for split, m in report["measured"].items()))
    print(f"wrote {out} and {folder / 'forecast.json'}")
    return 0


def cmd_reliability(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from probes import ifeval, reliability
    from probes.corpus import CORPORA
    from steerer.bank import DEFAULT_BANK, ProbeBank
    from steerer.model import load_model

    bank = ProbeBank.load(args.bank)
    corpus = Path(args.corpus) if args.corpus else REPO / bank.extra["corpus"] if "corpus" in bank.extra \
        else CORPORA / bank.model
    if not (corpus / ifeval.FILE).exists():
        raise FileNotFoundError(f"no IFEval responses at {corpus / ifeval.FILE}: run `steerer probes ifeval`")
    lm = load_model(bank.model, threads=args.threads, device=args.device)
    bank.check_model(lm.fingerprint, lm.hidden_size)
    ranges = {t: reliability.measured_range(corpus, t) for t in bank.tasks}
    measured = reliability.ifeval_metrics(lm, bank, ifeval.load(corpus), ranges)
    command = shlex.join(["steerer", *sys.argv[1:]])
    rated = reliability.with_reliability(bank, measured, ranges, command)
    out = rated.save(args.out or args.bank or DEFAULT_BANK)
    report = reliability.write_report(Path(args.report), rated, measured, command)
    _print_probes(rated)
    print(f"wrote {out} and {report}")
    return 0


def cmd_keep_steering(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from steerer.bank import ProbeBank, content_version, keep_steering

    out = Path(args.out).resolve()
    if out in (Path(args.bank).resolve(), Path(args.steering_from).resolve()):
        raise ValueError("--out must be a folder of its own, not --bank or --steering-from")
    bank = keep_steering(ProbeBank.load(args.bank), ProbeBank.load(args.steering_from))
    if args.corpus:
        corpus = Path(args.corpus).resolve()
        if not (corpus / "manifest.json").exists():
            raise FileNotFoundError(f"--corpus {args.corpus}: no corpus manifest.json there")
        bank.extra["corpus"] = str(corpus.relative_to(REPO)) if corpus.is_relative_to(REPO) else str(corpus)
    bank.extra["assembled"] = shlex.join(["steerer", *sys.argv[1:]])
    bank.version = content_version(bank)
    saved = bank.save(out)
    _print_probes(bank)
    print(f"wrote {saved} (steering of {bank.extra['steering_from']['version']})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from steerer.bank import ProbeBank

    bank = ProbeBank.load(args.bank)
    print(f"bank {bank.version} for {bank.model} ({bank.fingerprint}), {len(bank.probes)} probes")
    _print_probes(bank)
    return 0


def _print_probes(bank) -> None:
    """One line per probe with its held-out quality on every column, its reliability and, when it is not
    reliable, which column failed; then the ones a server mutes by default."""
    from steerer.reliability import describe

    for probe in bank.probes:
        m = probe.metrics
        fmt = lambda key, spec, m=m: "n/a" if m.get(key) is None else format(m[key], spec)  # noqa: E731
        flag = probe.threshold if probe.flag_threshold is None else probe.flag_threshold
        ci = "[n/a]" if probe.auroc_ci is None else f"[{probe.auroc_ci[0]:.2f}, {probe.auroc_ci[1]:.2f}]"
        failed = ",".join(probe.failed_columns)
        limits = probe.reliable_range
        state = "reliable" if probe.reliable else "reliability unknown" if probe.reliable is None and \
            probe.reliability is None else f"UNRELIABLE (failed: {failed or 'no column passed'})" if limits is None \
            else "reliable within " + ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in limits.items()) + \
            f" (failed: {failed})"
        held = "" if m.get("heldout_phrasing_auroc") is None else \
            f" held-out phrasing {m['heldout_phrasing_auroc']:.3f}"
        ifeval = "" if m.get("ifeval_auroc_ci") is None else \
            f" IFEval {m['ifeval_auroc']:.3f} [{m['ifeval_auroc_ci'][0]:.2f}, {m['ifeval_auroc_ci'][1]:.2f}]"
        print(f"{probe.task:18s} layer {probe.layer:2d} {m.get('design', probe.method):20s} threshold "
              f"{probe.threshold:.3f} flag {flag:.3f}  test AUROC {fmt('test_auroc', '.3f')} {ci} n={fmt('n_test', 'd')}"
              f"{held}{ifeval} acc {fmt('test_accuracy', '.3f')}  false flags {fmt('test_false_flag_rate', '.2f')} "
              f"violations flagged {fmt('test_violations_flagged', '.2f')}  {state}")
    muted = [p for p in bank.probes if not p.reliable]
    if muted:
        print("muted when served (--use-unreliable-probes overrides): " + "; ".join(
            f"{p.task}: {describe(p.reliability) if p.reliability else p.unreliable_reason()}"
            + (", muted only outside that range" if p.reliable_range else "") for p in muted))


def cmd_corpus(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from probes.corpus import CorpusConfig, build_corpus, default_out
    from probes.corpus_vllm import open_engine, resolve_engine
    from probes.tasks import TASKS

    for flag in ("per_task", "batch_size", "round_size", "max_new_tokens", "max_new_tokens_other"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    config = CorpusConfig(tasks=tuple(_tasks(args.tasks) or TASKS), per_task=args.per_task,
                          batch_size=args.batch_size, round_size=args.round_size, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, max_new_tokens_other=args.max_new_tokens_other,
                          max_rounds=args.max_rounds, ranges=args.ranges)
    engine = "hf" if args.relabel else resolve_engine(args.engine)  # relabelling needs the tokenizer only
    print(f"corpus engine: {engine}" + (" (auto)" if args.engine == "auto" else ""), file=sys.stderr)
    lm, generator = open_engine(engine, args.model, batch_size=args.batch_size, threads=args.threads,
                                device=args.device)
    out = Path(args.out) if args.out else default_out(lm.name, args.ranges)
    if args.relabel:
        from probes.corpus import relabel_onsets

        for task, n in relabel_onsets(out, lm.tokenizer).items():
            print(f"{task:18s} {n} rows relabelled")
        return 0
    command = shlex.join(["steerer", *sys.argv[1:]])
    manifest = build_corpus(lm, out, config, command=command, generator=generator)
    for task, info in manifest["tasks"].items():
        print(f"{task:18s} n={info['n']:4d} satisfied={info['satisfied']:4d} violated={info['violated']:4d} "
              f"generated={info['generated']:5d} discarded={info['discarded']:4d} "
              f"{'complete' if info['complete'] else 'INCOMPLETE'}")
    print(f"wrote {out}")
    return 0


def cmd_ifeval(args: argparse.Namespace) -> int:
    from probes import ifeval
    from probes.corpus import default_out
    from steerer.model import load_model

    lm = load_model(args.model, threads=args.threads, device=args.device)
    path = ifeval.generate(lm, Path(args.corpus) if args.corpus else default_out(lm.name))
    rows = ifeval.load(path.parents[1])
    print(f"wrote {path}: {len(rows)} responses, {sum(r['satisfied'] for r in rows)} satisfied")
    return 0


def cmd_ranges(args: argparse.Namespace) -> int:
    from probes.ifeval_ranges import main

    return main(args)


def cmd_score(args: argparse.Namespace) -> int:
    from probes.scoring import score_file

    if not Path(args.input).is_file():
        raise FileNotFoundError(f"input file not found: {args.input}")
    ok, bad = score_file(args.input, args.output, args.bank, args.model, args.max_new_tokens, args.batch_size,
                         device=args.device)
    import sys

    print(f"scored {ok} rows, {bad} errors", file=sys.stderr)
    return 0
