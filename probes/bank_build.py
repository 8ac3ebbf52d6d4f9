"""`steerer bank build`: a bank for a model in one command, planned first, every stage resumable.

Stages, each recorded in ``DIR/build/state.json`` when it finishes (a rerun skips finished stages and the
corpus and feature stages continue where they stopped):
    corpus       probes.corpus.build_corpus, class-balanced rounds, bounded (``max_generated_factor``); or,
                 with ``--corpus DIR``, that existing corpus of this model, checked and copied (nothing generated)
    features     probes.features.featurise with the layout the plan priced (probes.plan.feature_layout)
    probes       probes.pipeline.train_corpus -> a probe per trainable task
    warnings     probes.warning.train_warnings
    steering     probes.steering.run -> steering layer, direction and strength per task
    reliability  IFEval responses for the tasks IFEval covers, then probes.reliability.with_reliability
A task whose corpus ends without enough rows of both classes (a random model, a task the model never follows)
is reported untrainable in the card and left out; the build goes on with the others.

Layout of DIR: the bank itself (manifest.json, probes.safetensors, warning/: serve it with ``--bank DIR``),
README.md (the card), corpus/, features/, reports/, build/ (state and intermediate banks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STAGES = ("corpus", "features", "probes", "warnings", "steering", "reliability")
MIN_CLASS = 4  # rows of each class a task needs to be trainable (grouped CV folds hold both classes)


@dataclass(frozen=True)
class BuildConfig:
    model: str | None
    out: Path
    tasks: tuple[str, ...]
    per_task: int = 640
    device: str = "auto"
    engine: str = "auto"
    batch_size: int = 48
    max_generated_factor: float = 5.0  # a task gives up after per_task x this many responses
    steer_prompts: int = 20
    threads: int | None = None
    max_new_tokens: int | None = None  # one corpus token budget for every task (None: the corpus defaults)
    corpus: Path | None = None  # `--corpus`: start from this existing corpus instead of generating one


def add_commands(sub) -> None:
    bank = sub.add_parser("bank", help="build a probe bank for a model in one command")
    bsub = bank.add_subparsers(dest="bank_command", required=True)
    build = bsub.add_parser("build", help="plan, then corpus -> features -> probes -> warning predictors -> "
                                          "steering sweep -> reliability; resumable (rerun to continue)")
    build.add_argument("--model", default=None, help="model name or folder (default: the default model)")
    build.add_argument("--out", required=True, help="bank folder (also holds the build's state)")
    build.add_argument("--tasks", default=None, help="comma-separated task ids (default: the nine built-in and "
                       "those of --task-file; a plugin's task when named)")
    build.add_argument("--task-file", action="append", default=[], help="YAML task file to register (repeatable)")
    build.add_argument("--per-task", type=int, default=640, help="kept corpus responses per task")
    build.add_argument("--engine", default="auto", choices=("auto", "hf", "vllm"),
                       help="corpus generator: transformers loop (hf) or vLLM; auto = vllm where it imports, else hf")
    build.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    build.add_argument("--max-generated-factor", type=float, default=5.0,
                       help="give a task up after per-task x this many responses (bounds a model that never "
                            "produces one class)")
    build.add_argument("--corpus", default=None, metavar="DIR",
                       help="start from this existing corpus of the model (`steerer probes corpus`'s folder, or "
                            "another build's DIR/corpus) instead of generating one; copied into DIR/corpus")
    build.add_argument("--steer-prompts", type=int, default=20, help="training-split prompts per task in the "
                                                                      "steering sweep")
    build.add_argument("--dry-run", action="store_true", help="print the plan only (needs only config.json)")
    build.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    build.set_defaults(handler=cmd_bank_build)


def register_task_files(paths: list[str]) -> list[str]:
    """Register each YAML task file (engineer E's loader); their task ids."""
    from steerer.tasks import load_task_file

    return [load_task_file(p).id for p in paths]


def model_folder(model: str | None) -> Path:
    """The folder holding the model's config.json, without loading (or needing) weights or a tokenizer."""
    from steerer.model import resolve_model_path

    return Path(resolve_model_path(model))


def plan_for(config: BuildConfig, flops: float | None = None):
    from probes.plan import make_plan, read_given_corpus, resolve_plan_device, shape_from_config

    shape = shape_from_config(model_folder(config.model))
    device, why = resolve_plan_device(config.device, shape)
    given = read_given_corpus(config.corpus, config.tasks) if config.corpus else None
    return make_plan(config.model or "default", shape, list(config.tasks), config.per_task, device,
                     config.batch_size, flops, steer_prompts=config.steer_prompts, device_note=why, corpus=given)


def cmd_bank_build(args: argparse.Namespace) -> int:
    from probes.tasks import TASKS, get_task
    from steerer.tasks.registry import builtin_ids

    if args.per_task < 1:
        raise ValueError("--per-task must be >= 1")
    if args.steer_prompts < 1:
        raise ValueError("--steer-prompts must be >= 1")
    if args.max_generated_factor < 1:
        raise ValueError("--max-generated-factor must be >= 1")
    file_tasks = register_task_files(args.task_file)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()] or list(dict.fromkeys(
        [*(t for t in TASKS if t in builtin_ids()), *file_tasks]))  # plugins only when named
    for task in tasks:
        get_task(task)  # an unknown id is one line naming it
    from probes.corpus_vllm import resolve_engine

    # a plan may be for another machine: a dry run does not require vLLM here; a given corpus needs no engine
    engine = ("given" if args.corpus else "vllm" if args.dry_run and args.engine == "vllm"
              else resolve_engine(args.engine))
    config = BuildConfig(args.model, Path(args.out), tuple(tasks), args.per_task, args.device, engine,
                         max_generated_factor=args.max_generated_factor, steer_prompts=args.steer_prompts,
                         threads=args.threads, corpus=Path(args.corpus).resolve() if args.corpus else None)
    plan = plan_for(config)
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        print("\n".join(plan.lines()))
    print(f"corpus: given ({config.corpus}), nothing generated" if config.corpus else
          f"corpus engine: {engine}" + (" (auto)" if args.engine == "auto" else ""),
          file=sys.stderr if args.json else sys.stdout)
    if args.dry_run:
        return 0
    from probes.plan import check_runnable

    check_runnable(plan)
    state = run_build(config, plan.to_json(), log=lambda m: print(m, file=sys.stderr if args.json else sys.stdout))
    out = {"out": str(config.out), "stages": {k: v.get("seconds") for k, v in state["stages"].items()},
           "untrainable": state.get("untrainable", {})}
    print(json.dumps(out) if args.json else f"bank written to {config.out} (card: {config.out / 'README.md'})")
    return 0


# --------------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------------


def _state_path(out: Path) -> Path:
    return out / "build" / "state.json"


def load_state(out: Path) -> dict:
    path = _state_path(out)
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def save_state(out: Path, state: dict) -> None:
    path = _state_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _check_same_build(state: dict, key: dict, out: Path) -> None:
    if state.get("key") not in (None, key):
        raise ValueError(f"{out} holds a build with other settings ({state['key']}); use another --out")


def trainable(manifest_tasks: dict, minimum: int = MIN_CLASS) -> tuple[list[str], dict[str, str]]:
    """(tasks with enough rows of both classes, {untrainable task: why}) from the corpus manifest."""
    ok, bad = [], {}
    for task, info in manifest_tasks.items():
        if min(info["satisfied"], info["violated"]) >= minimum:
            ok.append(task)
        else:
            bad[task] = (f"the model produced {info['satisfied']} compliant and {info['violated']} violating "
                         f"responses in {info['generated']} generated ({info['rounds']} rounds); a probe needs "
                         f">= {minimum} of each")
    return ok, bad


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------


def run_build(config: BuildConfig, plan: dict, log=print, stop_after: str | None = None) -> dict:
    """Run the stages not finished yet; the state. `stop_after`: end after that stage (tests, partial runs)."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out)
    key = {"model": config.model, "tasks": list(config.tasks), "per_task": config.per_task}
    if config.corpus is not None:  # only then: builds begun before --corpus existed still resume
        key["corpus"] = str(config.corpus)
    _check_same_build(state, key, out)
    state["key"], state["plan"] = key, plan
    save_state(out, state)
    lm = None
    start_all = time.perf_counter()
    pace = Pace()
    for i, stage in enumerate(STAGES):
        if state["stages"].get(stage, {}).get("done"):
            log(f"[{i + 1}/{len(STAGES)}] {stage}: done earlier, skipped")
            if stage == stop_after:
                break
            continue
        if stage != "corpus" and not state.get("trainable"):
            log(f"[{i + 1}/{len(STAGES)}] {stage}: no trainable task, skipped")
            state["stages"][stage] = {"done": True, "seconds": 0.0, "skipped": "no trainable task"}
            save_state(out, state)
            continue
        if lm is None:
            from steerer.model import load_model

            lm = load_model(config.model, threads=config.threads, device=config.device)
        planned = plan["stages"].get(stage, {}).get("seconds", 0)
        left = sum(plan["stages"].get(s, {}).get("seconds", 0) for s in STAGES[i:]) * pace.factor
        log(f"[{i + 1}/{len(STAGES)}] {stage}: planned ~{planned * pace.factor / 60:.1f} min; build ETA "
            f"~{left / 60:.1f} min{pace.note()} (elapsed {(time.perf_counter() - start_all) / 60:.1f} min)")
        start = time.perf_counter()
        info = STAGE_FUNCTIONS[stage](lm, config, state) or {}
        pace.add(planned, time.perf_counter() - start)
        state["stages"][stage] = {"done": True, "seconds": round(time.perf_counter() - start, 1), **info}
        save_state(out, state)
        if stage == stop_after:
            break
    if all(state["stages"].get(s, {}).get("done") for s in STAGES):
        write_card(config, state)
    return state


@dataclass
class Pace:
    """Actual over planned time of the model-bound stages this run finished: the plan's time comes from a
    fraction of a second of matmul measured at start, which a busy (or idle) moment skews; the ETA follows
    what the stages really took once one has."""
    planned: float = 0.0
    actual: float = 0.0

    MIN_PLANNED = 5.0  # seconds: stages planned shorter than this are overhead-bound and say nothing

    def add(self, planned: float, actual: float) -> None:
        if planned >= self.MIN_PLANNED:
            self.planned += planned
            self.actual += actual

    @property
    def factor(self) -> float:
        return self.actual / self.planned if self.planned else 1.0

    def note(self) -> str:
        return f" (plan x{self.factor:.2g}, as measured so far)" if self.planned else ""


def _paths(out: Path) -> dict[str, Path]:
    return {"corpus": out / "corpus", "features": out / "features", "reports": out / "reports",
            "build": out / "build"}


def _command() -> str:
    import shlex

    return shlex.join(["steerer", *sys.argv[1:]])


def stage_corpus(lm, config: BuildConfig, state: dict) -> dict:
    if config.corpus is not None:
        return stage_given_corpus(lm, config, state)
    from probes.corpus import CorpusConfig, build_corpus

    budgets = {} if config.max_new_tokens is None else {"max_new_tokens": config.max_new_tokens,
                                                         "max_new_tokens_other": config.max_new_tokens}
    corpus_config = CorpusConfig(tasks=config.tasks, per_task=config.per_task, batch_size=config.batch_size,
                                 round_size=min(48, config.per_task), max_generated_factor=config.max_generated_factor,
                                 **budgets)
    from probes.corpus_vllm import VLLMCorpusGenerator, resolve_engine

    generator, engine = None, resolve_engine(config.engine)
    if engine == "vllm":

        generator = VLLMCorpusGenerator(config.model, batch_size=config.batch_size, threads=config.threads)
        if generator.model.fingerprint != lm.fingerprint:
            raise ValueError(f"vLLM loaded other weights (fingerprint {generator.model.fingerprint}) than "
                             f"transformers ({lm.fingerprint}) for {config.model or 'the default model'}")
    try:
        manifest = build_corpus(lm, _paths(config.out)["corpus"], corpus_config, command=_command(),
                                generator=generator)
    finally:
        if generator is not None:
            generator.close()
    ok, bad = trainable(manifest["tasks"])
    state["trainable"], state["untrainable"] = ok, bad
    return {"rows": sum(t["n"] for t in manifest["tasks"].values()),
            "generated": sum(t["generated"] for t in manifest["tasks"].values()), "engine": engine}


def stage_given_corpus(lm, config: BuildConfig, state: dict) -> dict:
    """`--corpus`: check the folder is a corpus of this model holding every task, copy it into DIR/corpus (later
    stages write IFEval's responses there, never into the source), and judge trainability from its counts."""
    from probes.plan import read_given_corpus

    given = read_given_corpus(config.corpus, config.tasks)
    if given.fingerprint != lm.fingerprint:
        raise ValueError(f"--corpus {given.folder} is a corpus of another model ({given.model}, fingerprint "
                         f"{given.fingerprint}); {lm.name} has fingerprint {lm.fingerprint}")
    target = _paths(config.out)["corpus"]
    tmp = target.with_name(".corpus.tmp")
    for stale in (tmp, target):  # an interrupted copy starts over; the source is the truth
        if stale.exists():
            shutil.rmtree(stale)
    shutil.copytree(given.folder, tmp)
    os.replace(tmp, target)
    manifest = json.loads((target / "manifest.json").read_text())
    ok, bad = trainable({t: manifest["tasks"][t] for t in config.tasks})
    state["trainable"], state["untrainable"] = ok, bad
    state["corpus_source"] = {"folder": str(given.folder), "model": given.model, "fingerprint": given.fingerprint,
                              "rows": given.rows, "ifeval": given.ifeval}
    return {"rows": sum(given.rows.values()), "generated": 0, "engine": "given", "source": str(given.folder)}


def stage_features(lm, config: BuildConfig, state: dict) -> dict:
    from probes import ifeval
    from probes.corpus import load_corpus
    from probes.features import featurise
    from probes.plan import FeatureLayout

    layout = state["plan"]["layout"]
    chosen = FeatureLayout(lm.num_layers, lm.hidden_size, tuple(layout["token_layers"]),
                           None if layout["position_layers"] is None else tuple(layout["position_layers"]))
    corpus = _paths(config.out)["corpus"]
    rows = {t: load_corpus(corpus, t) for t in state["trainable"]}
    if (corpus / ifeval.FILE).exists():  # a given corpus's IFEval responses: training measures its ifeval column
        rows[ifeval.TASK] = ifeval.load(corpus)  # all of them: `pipeline.load_ifeval` reads them in file order
    featurise(lm, {t: r for t, r in rows.items() if r}, _paths(config.out)["features"], layout=chosen)
    size = sum(p.stat().st_size for p in _paths(config.out)["features"].rglob("*.safetensors"))
    return {"bytes": size}


def _lens(lm):
    from steerer.lens import LensWeights

    return LensWeights.of(lm.model), lm.tokenizer


def _fmanifest(config: BuildConfig) -> dict:
    return json.loads((_paths(config.out)["features"] / "manifest.json").read_text())


def stage_probes(lm, config: BuildConfig, state: dict) -> dict:
    from probes import evaluation, pipeline
    from steerer.bank import content_version
    from steerer.monitor import MonitorConfig

    p, fm = _paths(config.out), _fmanifest(config)
    tasks = state["trainable"]
    datas, results = pipeline.train_corpus(p["corpus"], p["features"], tasks, fm["token_layers"], _lens(lm))
    entries = [evaluation.bank_entry(t, results[t]["probe"], datas[t], fm["hidden_size"], fm["token_layers"],
                                     results[t]["measured"], MonitorConfig()) for t in tasks]
    summary = pipeline.generalisation_summary(results)
    pipeline.write_generalisation(p["reports"], summary)
    extra = {"corpus": str(p["corpus"].resolve()), "command": _command(),
             **({"corpus_source": state["corpus_source"]["folder"]} if state.get("corpus_source") else {}),
             "generalisation": {t: {k: (g[k] or {}).get("auroc") for k in ("test", "heldout_phrasing", "ifeval")}
                                for t, g in summary.items()}}
    bank = evaluation.assemble_bank(entries, lm.name, lm.fingerprint, fm["hidden_size"], "pending", extra)
    bank.version = content_version(bank)
    bank.save(p["build"] / "bank-probes")
    return {"tasks": tasks}


def stage_warnings(lm, config: BuildConfig, state: dict) -> dict:
    from probes import forecast, ifeval
    from probes.warning import train_warnings, write_report
    from steerer.bank import ProbeBank, content_version

    p, fm = _paths(config.out), _fmanifest(config)
    bank = ProbeBank.load(p["build"] / "bank-probes")
    token_layers = fm["token_layers"]
    layers = token_layers[1::2] or token_layers
    warned, report = train_warnings(p["corpus"], p["features"], bank, list(bank.tasks), token_layers, layers,
                                    *_lens(lm))
    warned.extra = warned.extra | {"warning": {"command": _command(),
                                               "chosen": {t: r["chosen"]["kind"] for t, r in report.items()}}}
    forecast_report = None
    if forecast.TASK in bank.tasks:  # term_exclusion's early warning is the forecast (`steerer probes forecast`)
        splits = ("test", "heldout_phrasing") + (("ifeval",) if (p["corpus"] / ifeval.FILE).exists() else ())
        warned, forecast_report = forecast.train_forecast(lm, p["corpus"], warned, forecast_layers(token_layers,
                                                          lm.num_layers), progress=False, splits=splits)
        warned.extra["warning"]["forecast_command"] = _command()
    warned.version = content_version(warned)
    warned.save(p["build"] / "bank-warnings")
    write_report(p["reports"] / "warning", report, warned.version, _command())
    if forecast_report is not None:
        (p["reports"] / "warning" / "forecast.json").write_text(json.dumps(
            {"bank_version": warned.version, "command": _command(), **forecast_report}, indent=1))
    return {"forecast": forecast_report["chosen"] if forecast_report else None}


def forecast_layers(token_layers: list[int], num_layers: int) -> list[int]:
    """The forecast's candidate layers: the stored token layers from three to five tenths of the stack (where
    the default model's forbidden words read early; its 30 layers give `steerer probes forecast`'s 9, 12, 15)."""
    return [layer for layer in token_layers if 0.3 * num_layers <= layer <= 0.5 * num_layers] or token_layers


def steering_layers(token_layers: list[int]) -> list[int]:
    """Up to four candidate steering layers: the token layers between a fifth and nine tenths of the stack."""
    top = max(token_layers)
    inner = [layer for layer in token_layers if 0.15 * top <= layer <= 0.9 * top] or token_layers
    step = max(1, len(inner) // 4)
    return inner[step - 1::step][:4] if len(inner) > 4 else inner


def stage_steering(lm, config: BuildConfig, state: dict) -> dict:
    from probes import steering
    from steerer.bank import ProbeBank, content_version

    p, fm = _paths(config.out), _fmanifest(config)
    source = ProbeBank.load(p["build"] / "bank-warnings")
    tasks = list(source.tasks)
    directions, unsteerable, doc = {}, {}, {}
    for task in tasks:  # one at a time: a task without a direction (no request with both classes) skips alone
        sweep = steering.SweepConfig(
            tasks=[task], layers=steering_layers(fm["token_layers"]), n=config.steer_prompts,
            where_tasks=tuple(t for t in ("lowercase",) if t == task), extra={"command": _command()})
        try:
            doc, found = steering.run(lm, source, p["corpus"], p["features"], sweep, p["reports"] / "steering")
        except ValueError as exc:
            unsteerable[task] = str(exc)
            continue
        directions |= found
    state["unsteerable"] = unsteerable
    choices = {t: steering.choice_record(doc["tasks"][t]) for t in directions}
    bank = steering.steered_bank(source, choices, directions)
    bank = steering.without_looping_steering(bank, doc)  # loops only: steering off
    bank.extra["steering_sweep"] = {"command": _command(), "report": str(p["reports"] / "steering"),
                                    "source_bank": source.version,
                                    "kept_source_steering": [t for t in tasks if t not in directions]}
    bank.version = content_version(bank)
    bank.save(p["build"] / "bank-steering")
    if doc:
        steering.save_doc(doc, p["reports"] / "steering")
    return {"steered": sorted(directions), "unsteerable": unsteerable}


def stage_reliability(lm, config: BuildConfig, state: dict) -> dict:
    from probes import ifeval, reliability
    from steerer.bank import ProbeBank

    p = _paths(config.out)
    bank = ProbeBank.load(p["build"] / "bank-steering")
    covered = sorted({r["task"] for r in ifeval.mapped_rows()} & set(bank.tasks))
    measured: dict = {}
    if covered:
        if not (p["corpus"] / ifeval.FILE).exists():
            ifeval.generate(lm, p["corpus"], tasks=covered)
        rows = [r for r in ifeval.load(p["corpus"]) if r["task"] in covered]
        measured = reliability.ifeval_metrics(lm, bank, rows, {t: reliability.measured_range(p["corpus"], t)
                                                               for t in covered})
    ranges = {t: reliability.measured_range(p["corpus"], t) for t in bank.tasks}
    rated = reliability.with_reliability(bank, measured, ranges, _command())
    rated.save(p["build"] / "bank-final")
    reliability.write_report(p["reports"] / "reliability", rated, measured, _command())
    publish(p["build"] / "bank-final", config.out)
    return {"ifeval_tasks": covered}


STAGE_FUNCTIONS = {"corpus": stage_corpus, "features": stage_features, "probes": stage_probes,
                   "warnings": stage_warnings, "steering": stage_steering, "reliability": stage_reliability}


def publish(bank_folder: Path, out: Path) -> None:
    """Copy a saved bank's files into `out` beside the build's own folders (ProbeBank.save replaces a whole
    folder, which would take the corpus with it): each file or folder replaced atomically by a rename."""
    for item in sorted(bank_folder.iterdir()):
        target = out / item.name
        tmp = out / f".{item.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if item.is_dir():
            shutil.copytree(item, tmp)
            if target.exists():
                shutil.rmtree(target)
        else:
            shutil.copy2(item, tmp)
        os.replace(tmp, target)


# --------------------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------------------


STEER_COLUMNS = (("layer", "d"), ("alpha", ".2f"), ("gain", "+.2f"), ("perplexity_ratio", ".3f"), ("n", "d"))


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _interval(col: dict) -> str:
    if col.get("auroc") is None:
        return "n/a"
    ci = col.get("ci")
    return f"{col['auroc']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] n={col['n']}" if ci else f"{col['auroc']:.3f} n={col['n']}"


def card_text(config: BuildConfig, state: dict, bank) -> str:
    """The bank's README.md: model, tasks, each probe's held-out columns with intervals, reliable or muted and
    why (probes.reliability.summary_table), steering measured, untrainable tasks and why, stage timings."""
    from probes.reliability import summary_table

    lines = [f"# Probe bank for {bank.model if bank else config.model}", "",
             f"Built by `{_command()}` (`steerer bank build`).", "",
             f"- model: `{config.model or 'default'}`" + (f" (fingerprint {bank.fingerprint}, version "
                                                          f"{bank.version})" if bank else ""),
             f"- tasks requested: {', '.join(config.tasks)}; " + (
                 f"corpus given: `{src['folder']}` (made by {src['model']}, fingerprint {src['fingerprint']}; "
                 f"{sum(src['rows'].values())} rows of these tasks), nothing generated"
                 if (src := state.get("corpus_source")) else f"{config.per_task} corpus responses per task"),
             f"- trainable: {', '.join(state.get('trainable') or []) or 'none'}", ""]
    if state.get("untrainable"):
        lines += ["## Untrainable tasks", "", "| task | why |", "|---|---|"]
        lines += [f"| {t} | {why} |" for t, why in state["untrainable"].items()] + [""]
    if bank is not None:
        table = summary_table(bank)
        found = {c for r in table for c in r["columns"]}
        names = [c for c in ("test", "heldout_phrasing", "ifeval") if c in found] + sorted(
            found - {"test", "heldout_phrasing", "ifeval"})
        lines += ["## Probes: held-out columns (AUROC [95% interval] n)", "",
                  "| task | layer | " + " | ".join(names) + " | verdict | failed |",
                  "|---|---|" + "---|" * len(names) + "---|---|"]
        layers = {p.task: p.layer for p in bank.probes}
        for r in table:
            cells = [_interval(r["columns"][n]) if n in r["columns"] else "-" for n in names]
            lines.append(f"| {r['task']} | {layers[r['task']]} | " + " | ".join(cells)
                         + f" | {r['served']} | {', '.join(r['failed']) or '-'} |")
        lines += ["", "## Steering measured (training-split prompts, greedy)", "",
                  "| task | layer | alpha | gain | perplexity ratio | n |", "|---|---|---|---|---|---|"]
        why = state.get("unsteerable") or {}
        for task in bank.tasks:
            c = (bank.extra.get("steering") or {}).get(task)
            if task in why:
                lines.append(f"| {task} | not swept: {why[task]} | | | | |")
                continue
            lines.append(f"| {task} | " + ("no swept cell gained at perplexity ratio <= 1.10 | | | | |" if not c else
                                           " | ".join(_num(c.get(k), f) for k, f in STEER_COLUMNS) + " |"))
    lines += ["", "## Build", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {state['stages'].get(s, {}).get('seconds')} |" for s in STAGES]
    return "\n".join(lines) + "\n"


def write_card(config: BuildConfig, state: dict) -> Path:
    from steerer.bank import ProbeBank

    bank = ProbeBank.load(config.out) if (config.out / "manifest.json").exists() else None
    path = config.out / "README.md"
    path.write_text(card_text(config, state, bank))
    return path
