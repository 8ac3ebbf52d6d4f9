"""`steerer serve` and `steerer client generate|health` (a plug-in of steerer/cli.py).

Nothing heavy is imported at parser-build time: every `steerer` command builds this parser.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from steerer.policy import GUARD, POLICY_CHOICES  # light: no torch

TOKEN_ENV = "STEERER_AUTH_TOKEN"
ADMIN_ENV = "STEERER_ADMIN_TOKEN"
DEFAULT_OUTCOME_LOG = "steerer-outcomes.sqlite"


def add_commands(sub) -> None:
    serve = sub.add_parser("serve", help="run the gRPC server (health, reflection, /metrics)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    serve.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0 = any, -1 = off)")
    serve.add_argument("--http-port", type=int, default=None,
                       help="also serve the OpenAI-compatible HTTP API on this port (0 = any; default: off)")
    serve.add_argument("--model", default=None, help="local path or Hugging Face id (default: embedded SmolLM2)")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    serve.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    serve.add_argument("--bank", default=None, help="probe-bank folder (default: the shipped bank)")
    serve.add_argument("--use-unreliable-probes", action="store_true",
                       help="also flag and steer with probes whose 95%% test-AUROC interval reaches chance "
                            "(default: they are muted; their risk is still reported)")
    serve.add_argument("--stop-steering-on-detection", action="store_true",
                       help="end a task's conditional steering once its violation is detected (default: it goes on "
                            "for the rest of the response); transformers engine")
    serve.add_argument("--max-batch", type=int, default=32, help="requests sharing one forward pass")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before RESOURCE_EXHAUSTED")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048)
    serve.add_argument("--max-new-tokens", type=int, default=1024, help="cap on a request's max_new_tokens")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="when idle, wait this long for more arrivals to prefill together")
    serve.add_argument("--batch-wait-max-ms", type=float, default=50.0,
                       help="when idle, keep waiting while arrivals keep coming (each resets --batch-wait-ms), "
                            "at most this long")
    serve.add_argument("--prefill-chunk", type=int, default=8,
                       help="while rows decode, admit at most this many requests per step (one prefill)")
    serve.add_argument("--admit-wait-ms", type=float, default=50.0,
                       help="while rows decode, a partial chunk waits this long for more arrivals")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds streams get to finish on shutdown")
    serve.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    serve.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                       help="hf: transformers (default); vllm: vLLM's CPU build, compiled (needs the vLLM venv)")
    serve.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="--engine vllm: tensor-parallel ranks, one worker process each (docs/VLLM.md)")
    serve.add_argument("--engine-core", default="process", choices=["process", "inproc"],
                       help="--engine vllm: the driver in vLLM's own engine-core process (default), or vLLM's "
                            "engine core in this one (inproc: the guard on the CPU backend needs it; docs/VLLM.md)")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    serve.add_argument("--tls-key", default=None, help="PEM private key")
    serve.add_argument("--auth-token", default=None,
                       help=f"require 'authorization: Bearer TOKEN' (default: ${TOKEN_ENV} if set)")
    serve.add_argument("--admin-token", default=None,
                       help=f"the credential of admin RPCs (ReloadProbeBank), 'authorization: Bearer TOKEN'; "
                            f"without one they are refused (default: ${ADMIN_ENV} if set)")
    serve.add_argument("--unread-stream-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="cancel a stream whose response is finished but which its client has not read "
                            "within this time, freeing its server thread (default 30)")
    serve.add_argument("--experiments", default=None,
                       help="A/B experiments file (.yaml/.json, docs/AB.md); SIGHUP reloads it")
    serve.add_argument("--outcome-log", default=None,
                       help=f"SQLite outcome log, one record per finished response (default with --experiments: "
                            f"{DEFAULT_OUTCOME_LOG} in the working directory; 'none' = off)")
    serve.add_argument("--outcome-sync", default="normal", choices=["normal", "full"],
                       help="normal: no record lost to a process kill; full: none to power loss either (an fsync "
                            "per record)")
    serve.set_defaults(handler=cmd_serve)

    client = sub.add_parser("client", help="talk to a running server")
    csub = client.add_subparsers(dest="client_command", required=True)
    gen = csub.add_parser("generate", help="generate (optionally streaming) with constraints and steering")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None)
    gen.add_argument("--constraint", action="append", default=[], metavar="TASK[:JSON]",
                     help='e.g. word_count:\'{"relation": "at most", "limit": 30}\' (repeatable)')
    gen.add_argument("--policy", default="off", choices=POLICY_CHOICES)
    gen.add_argument("--alpha", type=float, default=0.0, help="steering strength for --policy")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--request-id", default="")
    gen.add_argument("--experiment-key", default="")
    gen.add_argument("--force-arm", action="append", default=[], metavar="EXPERIMENT=ARM",
                     help="QA: run in this arm of the experiment whatever the key (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--json", action="store_true", help="print the response (or each stream message) as JSON")
    gen.set_defaults(handler=cmd_client_generate)
    check = csub.add_parser("health", help="exit 0 only when the server reports SERVING")
    check.add_argument("--service", default="", help="service name ('' = the whole server)")
    check.set_defaults(handler=cmd_client_health)
    for p in (gen, check):
        p.add_argument("--target", required=True, metavar="HOST:PORT")
        p.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV} if set)")
        p.add_argument("--tls-ca", default=None, help="PEM root certificate: connect with TLS")
        p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


@functools.cache
def _usage_error() -> type[Exception]:
    from steerer.cli import UsageError

    # Also a ValueError: under `python -m steerer.cli` the running module is __main__, whose UsageError is
    # a different class from steerer.cli.UsageError, but its main() prints ValueErrors the same way.
    return type("ServiceUsageError", (UsageError, ValueError), {})


def _usage(message: str) -> Exception:
    return _usage_error()(message)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from steerer.bank import BankError, ProbeBank, muted_notice
    from steerer.model import load_model
    from steerer.service.server import ServerConfig, SteererServer, model_info_line

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(host=args.host, port=args.port,
                          metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                          http_port=args.http_port,
                          max_batch=args.max_batch, max_queue=args.max_queue,
                          max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                          batch_wait_ms=args.batch_wait_ms,
                          batch_wait_max_ms=args.batch_wait_max_ms, prefill_chunk=args.prefill_chunk,
                          admit_wait_ms=args.admit_wait_ms, grace_s=args.grace, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, auth_token=_serve_token(args.auth_token),
                          admin_token=_serve_token(args.admin_token, ADMIN_ENV),
                          unread_stream_timeout_s=args.unread_stream_timeout,
                          use_unreliable_probes=args.use_unreliable_probes, experiments=args.experiments,
                          stop_steering_on_detection=args.stop_steering_on_detection,
                          outcome_log=_outcome_log(args.outcome_log, args.experiments),
                          outcome_sync=args.outcome_sync)
    try:
        config.validate()
    except ValueError as exc:
        raise _usage(str(exc)) from None
    try:  # first: the bank registers the task files it carries, which experiments may name
        bank = ProbeBank.load(args.bank)
    except BankError as exc:
        raise _usage(f"{exc}{'' if args.bank else '; pass --bank FOLDER'}") from None
    if args.experiments:  # refuse a bad file before the model loads
        from steerer.ab.experiments import ExperimentError, load

        try:
            load(args.experiments)
        except ExperimentError as exc:
            raise _usage(str(exc)) from None
    if args.threads is not None and args.threads < 1:
        raise _usage("--threads must be >= 1")
    if args.tensor_parallel_size < 1 or (args.tensor_parallel_size > 1 and args.engine != "vllm"):
        raise _usage("--tensor-parallel-size must be >= 1, and above 1 only with --engine vllm")
    if args.engine == "vllm":
        from steerer.engine.vllm import MISSING, cli_environment, vllm_installed

        if not vllm_installed():
            raise _usage(MISSING)
        cli_environment()
        if args.device not in ("auto", "cpu"):
            raise _usage("--engine vllm runs on vLLM's CPU build: --device must be auto or cpu")
    factory = None
    if args.engine == "vllm":
        from steerer.engine.vllm.driver import VLLMModel, VLLMSteerer, scheduler_factory

        first = VLLMSteerer(bank, args.model, dtype=args.dtype, capacity=config.max_batch,
                            max_num_seqs=config.max_batch,
                            max_model_len=config.max_prompt_tokens + config.max_new_tokens + 1, check=False,
                            check_bank=False, use_unreliable_probes=args.use_unreliable_probes,
                            stop_steering_on_detection=args.stop_steering_on_detection,
                            threads=args.threads, layers="all",  # any bank can be swapped in
                            tensor_parallel_size=args.tensor_parallel_size,
                            engine_core=args.engine_core)
        lm, factory = VLLMModel(first, args.model), scheduler_factory(first)
    else:
        lm = load_model(args.model, dtype=args.dtype, threads=args.threads, device=args.device)
    try:
        bank.check_model(lm.fingerprint, lm.hidden_size)
        config.check_context(lm.max_positions)
    except (BankError, ValueError) as exc:
        raise _usage(str(exc)) from None
    notice = None if args.use_unreliable_probes else muted_notice(bank)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    try:
        server = SteererServer(lm, bank, config, steerer_factory=factory).start()
    except OSError as exc:
        raise _usage(str(exc)) from None
    print(model_info_line(server), flush=True)
    server.serve_forever()
    print("steerer: stopped", flush=True)
    return 0


def _outcome_log(flag: str | None, experiments: str | None) -> str | None:
    if flag is not None:
        return None if flag.lower() == "none" else flag
    return DEFAULT_OUTCOME_LOG if experiments else None


def _serve_token(flag: str | None, env: str = TOKEN_ENV) -> str | None:
    """The flag, else the environment; an empty value given either way stays empty (and is refused), so
    `--auth-token ""` cannot turn authentication off unnoticed."""
    return flag if flag is not None else os.environ.get(env)


def _client(args: argparse.Namespace):
    from steerer.service.client import SteererClient

    if args.tls_ca is not None and not os.path.isfile(args.tls_ca):
        raise _usage(f"--tls-ca file not found: {args.tls_ca}")
    return SteererClient(args.target, token=args.token or os.environ.get(TOKEN_ENV) or None, tls_ca=args.tls_ca)


def _rpc_error(exc) -> int:
    print(f"steerer: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def cmd_client_generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from steerer.constraints import Constraint
    from steerer.service.client import build_request, event_lines

    constraints = []
    for text in args.constraint:
        try:
            c = Constraint.parse(text)
        except ValueError as exc:
            raise _usage(str(exc)) from None
        constraints.append((c.task, c.params))
    policy = f"{args.policy}:{args.alpha!r}" if args.policy != GUARD else GUARD
    forced = {}
    for text in args.force_arm:
        name, sep, arm = text.partition("=")
        if not sep or not name or not arm:
            raise _usage(f"--force-arm takes EXPERIMENT=ARM, got {text!r}")
        forced[name] = arm
    try:
        request = build_request(args.prompt, constraints=constraints, policy=policy, system=args.system,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, request_id=args.request_id,
                                experiment_key=args.experiment_key, force_arms=forced, check=True)
    except (ValueError, TypeError) as exc:
        raise _usage(str(exc)) from None

    def as_json(message) -> str:
        return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))

    with _client(args) as client:
        try:
            if not args.stream:
                reply = client.generate(request, timeout=args.timeout)
                print(as_json(reply) if args.json else reply.text, flush=True)
                if not args.json:
                    _summary(reply)
                return 0
            for message in client.stream(request, timeout=args.timeout):
                if args.json:
                    print(as_json(message), flush=True)
                elif message.HasField("token"):
                    sys.stdout.write(message.token.text)
                    sys.stdout.flush()
                    for line in event_lines(message.token):  # flags (predictions) and detections, apart
                        print(line, file=sys.stderr, flush=True)
                else:
                    print(flush=True)
                    _summary(message.final)
            return 0
        except grpc.RpcError as exc:
            return _rpc_error(exc)


def _summary(reply) -> None:
    """Verdicts and usage on stderr, so stdout is just the text."""
    from steerer.service.client import detection_note

    parts = [f"finish {reply.finish_reason}", f"{reply.usage.completion_tokens} tokens", f"bank {reply.bank_version}"]
    parts += [f"experiment {a.experiment}: arm {a.arm}{' (forced)' if a.forced else ''}" for a in reply.arms]
    for v in reply.verdicts:
        actual = ("satisfied" if v.satisfied else "violated") if v.HasField("satisfied") else "unchecked"
        p = f"p={v.p_satisfied_end:.2f}" if v.HasField("p_satisfied_end") else "no reading"
        steered = reply.usage.steered_tokens.get(v.task, 0)
        if v.probe_muted:
            why = f": {v.probe_note}" if v.probe_note else ""  # the failed held-out column, or the param out of range
            parts.append(f"{v.task}: probe unreliable (muted, {p}), {actual}{detection_note(v)}{why}")
            continue
        predicted = "violation" if v.predicted_violation else "ok"
        note = "" if v.probe_reliable else " [probe unreliable]"
        parts.append(f"{v.task}: predicted {predicted} ({p}){note}, {actual}{detection_note(v)}, "
                     f"{'flagged' if v.flagged else 'not flagged'}, steered {steered}")
    print("; ".join(parts), file=sys.stderr, flush=True)


def cmd_client_health(args: argparse.Namespace) -> int:
    import grpc

    with _client(args) as client:
        try:
            status = client.health(args.service, timeout=args.timeout or 5)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(status)
    return 0 if status == "SERVING" else 1
