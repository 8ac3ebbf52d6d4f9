"""The `steerer` command line. Errors for bad input are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from steerer.policy import POLICY_CHOICES  # light: no torch

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
# Modules that add their own sub-commands: each has `add_commands(subparsers)`, and every parser it adds
# sets `handler=` (a function of the parsed args returning an exit status) with `set_defaults`. The serving
# side's own are listed here; others (the probe-training commands) register under the `steerer.cli` entry
# point group, so this package never names a package that depends on it.
PLUGINS = ("steerer.service.cli",)
PLUGIN_GROUP = "steerer.cli"


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


class UsageError(Exception):
    """Bad user input: printed as one line, no traceback."""


def parse_layers(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise UsageError(f"--layers takes comma-separated integers, got {text!r}") from exc


def load_direction(path: str):
    """A steering direction from .npy, .safetensors (key 'direction' or the only tensor) or .json (list)."""
    import numpy as np
    import torch

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"steering direction file not found: {path}")
    if file.suffix == ".npy":
        vector = torch.from_numpy(np.load(file))
    elif file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(file)
        if "direction" in tensors:
            vector = tensors["direction"]
        elif len(tensors) == 1:
            vector = next(iter(tensors.values()))
        else:
            raise UsageError(f"{path}: several tensors and none named 'direction'")
    elif file.suffix == ".json":
        vector = torch.tensor(json.loads(file.read_text()), dtype=torch.float32)
    else:
        raise UsageError(f"{path}: use a .npy, .safetensors or .json file for the direction")
    return vector.float().flatten()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser("prepare", help="convert the bundled GGUF into a cached safetensors folder")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
    model_sub.add_parser("info", help="print the model's path, shape and fingerprint")
    for p in (prepare, model_sub.choices["info"]):
        p.add_argument("--model", default=None, help="local path or Hugging Face id (default: embedded SmolLM2)")

    gen = sub.add_parser("generate", help="generate with taps (and optional steering) on the residual stream")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default=None, help="local path or Hugging Face id (default: embedded SmolLM2)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--layers", default=None, help="comma-separated decoder layers to tap (for --json norms)")
    gen.add_argument("--steer-direction", default=None, help=".npy/.safetensors/.json vector of hidden size")
    gen.add_argument("--steer-layer", type=int, default=None)
    gen.add_argument("--alpha", type=float, default=0.0, help="absolute L2 norm of the added vector")
    gen.add_argument("--steer-where", default="generated", choices=["prompt", "generated", "both"])
    gen.add_argument("--json", action="store_true", help="print tokens with the norms of the tapped residuals")
    gen.add_argument("--constraint", action="append", default=[], metavar="TASK[:JSON]",
                     help='monitor a constraint, e.g. word_count:\'{"relation": "at most", "limit": 20}\' (repeatable)')
    gen.add_argument("--policy", default="off", choices=POLICY_CHOICES,
                     help="steering policy for every constraint (needs --constraint); guard[+KIND] vetoes "
                          "tokens that would break it (docs/GUARD.md)")
    gen.add_argument("--bank", default=None, help="probe bank folder (default: the shipped bank)")
    gen.add_argument("--use-unreliable-probes", action="store_true",
                     help="also flag and steer with probes whose 95%% test-AUROC interval reaches chance")
    gen.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                     help="hf: transformers (default); vllm: vLLM's CPU build, compiled (needs the vLLM venv)")
    import importlib
    from importlib.metadata import entry_points

    for name in PLUGINS:
        importlib.import_module(name).add_commands(sub)
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        entry.load()(sub)
    return parser


@command("model")
def cmd_model(args: argparse.Namespace) -> int:
    from steerer.model import DEFAULT_MODEL, load_model, prepare_default_model

    if args.model_command == "prepare":
        if args.model not in (None, DEFAULT_MODEL):
            raise UsageError("model prepare only converts the embedded default; other models load as they are")
        print(prepare_default_model(force=args.force))
        return 0
    lm = load_model(args.model)
    print(json.dumps({"model": lm.name, "layers": lm.num_layers, "hidden_size": lm.hidden_size,
                      "fingerprint": lm.fingerprint}))
    return 0


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    import math

    import torch

    from steerer.engine.hf import HFEngine
    from steerer.generation import ChainedHooks, SamplingParams, generate
    from steerer.model import chat_prompt, load_model
    from steerer.taps import FixedSteering, LayerHooks, LayerSteering, Where, unit_directions

    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if not math.isfinite(args.alpha):
        raise UsageError("--alpha must be a finite number")
    if (args.steer_direction is None) != (args.steer_layer is None):
        raise UsageError("--steer-direction and --steer-layer go together")
    if args.engine == "vllm":
        from steerer.engine.vllm import MISSING, cli_environment, vllm_installed

        if not vllm_installed():
            raise UsageError(MISSING)
        cli_environment(quiet=True)
        if args.steer_direction:
            raise UsageError("--engine vllm runs the monitored path or taps (--layers): no --steer-direction")
        if args.device not in ("auto", "cpu"):
            raise UsageError("--engine vllm runs on vLLM's CPU build: --device must be auto or cpu")
        if args.layers:
            if args.constraint or args.policy != "off":
                raise UsageError("--constraint cannot be combined with --steer-direction or --layers")
            return _generate_vllm_taps(args)
    if args.constraint or args.policy != "off" or args.engine == "vllm":
        return _generate_monitored(args)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    try:
        params.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    layers = parse_layers(args.layers)
    direction = load_direction(args.steer_direction) if args.steer_direction else None
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    steering = {}
    if direction is not None:
        if direction.numel() != lm.hidden_size:
            raise UsageError(f"direction has {direction.numel()} values; the model's hidden size is {lm.hidden_size}")
        steering[args.steer_layer] = LayerSteering(unit_directions(direction), Where(args.steer_where))
    try:
        hooks = LayerHooks(lm.model, tap_layers=layers, steering=steering)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    recorder = _NormRecorder(layers) if args.json else None
    fixed = FixedSteering(steering, {layer: torch.tensor([[args.alpha]]) for layer in steering})
    with hooks:
        result = generate(HFEngine(lm, hooks), [chat_prompt(lm.tokenizer, args.prompt)], params,
                          ChainedHooks([fixed, recorder]))[0]
    text = lm.tokenizer.decode(result.tokens, skip_special_tokens=True)
    if not args.json:
        print(text)
        return 0
    tokens = [{"index": i, "id": t, "text": lm.tokenizer.decode([t]), "norms": norms}
              for i, (t, norms) in enumerate(zip(result.tokens, recorder.norms, strict=False))]
    print(json.dumps({"model": lm.name, "prompt": args.prompt, "response": text,
                      "finish_reason": result.finish_reason, "layers": list(layers), "tokens": tokens}, indent=1))
    return 0


def _generate_vllm_taps(args: argparse.Namespace) -> int:
    """`--engine vllm --layers`: greedy tokens and tap norms through the vLLM op, no bank (`look.Look`); the
    transformers path's output, same JSON."""
    from steerer.engine.vllm.look import Look
    from steerer.model import DEFAULT_MODEL, chat_prompt

    if args.temperature != 0.0:
        raise UsageError("--engine vllm --layers decodes greedily: leave --temperature at 0")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    layers = parse_layers(args.layers)
    with Look(args.model, layers, dtype=args.dtype, max_num_seqs=1, seed=args.seed) as look:
        tokenizer = look.llm.get_tokenizer()
        trace = look.run([chat_prompt(tokenizer, args.prompt)], args.max_new_tokens)[0]
    from steerer.engine.vllm.driver import eos_ids

    tokens, norms = trace.tokens, trace.norms()
    if tokens and tokens[-1] in eos_ids(look.path, tokenizer):  # transformers' path leaves EOS out
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if not args.json:
        print(text)
        return 0
    rows = [{"index": i, "id": t, "text": tokenizer.decode([t]), "norms": n}
            for i, (t, n) in enumerate(zip(tokens, norms, strict=False))]
    finish = "length" if trace.finish_reason == "length" else "eos"
    print(json.dumps({"model": args.model or DEFAULT_MODEL, "prompt": args.prompt, "response": text,
                      "finish_reason": finish, "layers": list(layers), "tokens": rows}, indent=1))
    return 0


def _generate_monitored(args: argparse.Namespace) -> int:
    """Generation through the Steerer: tokens stream to stdout, flags (predictions) and detections (certain
    violations) to stderr as they happen."""
    from steerer.backend import Backend, generate
    from steerer.bank import ProbeBank
    from steerer.constraints import Constraint, validate_request
    from steerer.model import load_model
    from steerer.policy import PolicyKind, SteeringPolicy, check_strengths
    from steerer.request import Request, SamplingParams, TokenEvent

    if not args.constraint and args.policy != "off":
        raise UsageError("--policy steers along constraint probes: name at least one --constraint")
    if args.steer_direction or args.layers:
        raise UsageError("--constraint cannot be combined with --steer-direction or --layers")
    constraints = tuple(Constraint.parse(text) for text in args.constraint)
    policy = SteeringPolicy.named(args.policy, args.alpha)
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    request = Request(args.prompt, constraints, policy, sampling=sampling, id="cli")
    bank = ProbeBank.load(args.bank)
    # The one validation of this path, before the model loads; the backend remembers nothing of it, so its
    # `admit` checks the request once more (cheap, and the same rules: `validate_request`).
    validate_request(request, bank.tasks)
    if not args.use_unreliable_probes:
        for constraint in constraints:
            if constraint.task not in bank.tasks:  # served on its detector alone (`constraints.detector_only`)
                continue
            trusted, why = bank.reliable_for(constraint.task, dict(constraint.params))  # scoped: per request
            if not trusted:
                print(f"steerer: warning: the {constraint.task} probe is muted, no flags or steering "
                      f"({why}); --use-unreliable-probes to use it", file=sys.stderr)
    check_strengths(request, bank)  # a refused request gets its one line, not advice first
    for constraint in constraints:
        steering = request.policy_for(constraint.task)
        if steering.code != PolicyKind.OFF and steering.alpha and (why := bank.unsteerable(constraint.task)):
            print(f"steerer: warning: this bank advises against steering {constraint.task} ({why})", file=sys.stderr)
    engine: Backend
    if args.engine == "vllm":
        from steerer.engine.vllm.driver import VLLMSteerer

        engine = VLLMSteerer(bank, args.model, dtype=args.dtype, capacity=1, max_num_seqs=1,
                             use_unreliable_probes=args.use_unreliable_probes)
    else:
        from steerer.core import Steerer

        engine = Steerer(load_model(args.model, dtype=args.dtype, device=args.device), bank,
                         use_unreliable_probes=args.use_unreliable_probes)
    with engine as steerer:
        result = None
        for item in generate(steerer, [request]):
            if isinstance(item, TokenEvent):
                if not args.json:
                    print(item.text, end="", flush=True)
                for flag in item.flags:  # a probe's prediction
                    state = "raised" if flag.raised else "cleared"
                    print(f"\n[flag {state}: {flag.task} at token {flag.token_index}, risk {flag.risk:.2f}]",
                          file=sys.stderr, flush=True)
                for detection in item.detections:  # certain: the text so far already breaks the constraint
                    print(f"\n[DETECTED violation: {detection.task} broken at token {detection.token_index}]",
                          file=sys.stderr, flush=True)
            else:
                result = item
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(result), indent=1))
        return 0
    print()
    for v in result.verdicts:
        actual = {None: "not checkable", True: "satisfied", False: "violated"}[v.satisfied]
        p_end = "no reading" if v.p_satisfied_end is None else f"P(satisfied) at end {v.p_satisfied_end:.2f}"
        predicted = ("probe unreliable (muted)" if v.task in bank.tasks else v.probe_note) if v.probe_muted else \
            f"predicted {'violation' if v.predicted_violation else 'ok'}{'' if v.probe_reliable else ' (probe unreliable)'}"
        detected = "" if v.detected_at is None else f", detected at token {v.detected_at}"
        print(f"[{v.task}: {predicted} ({p_end}), checker: {actual}{detected}; "
              f"steered {result.steered_tokens[v.task]} tokens]", file=sys.stderr)
    return 0


class _NormRecorder:
    """Per chosen token, the L2 norms of the tapped residuals at the position that predicted it."""

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers
        self.norms: list[dict[str, float]] = []

    def before_forward(self, rows, index) -> None:
        pass

    def after_forward(self, view) -> None:
        self.norms.append({str(layer): round(float(view.residuals[layer][0].norm()), 3) for layer in self.layers})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from steerer.model import ModelError

    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except (UsageError, ModelError, ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"steerer: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the importable module's main, so exception classes that plug-ins import are the same objects.
    from steerer.cli import main as _main

    sys.exit(_main())
