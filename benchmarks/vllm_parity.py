"""The parity request set and its references: the transformers backend's results, and plain vLLM's tokens.

vLLM 0.32 needs transformers < 5.20 while steerer pins 5.24 (whose cache API the transformers backend
uses), so the two backends live in two venvs. `python benchmarks/vllm_parity.py --out ref.json`
(in the main venv) runs `Steerer` on `parity_requests()` and writes per request the tokens, text, finish
reason, steered-token counts, verdict readings and per-token P(satisfied) traces; the vLLM tests run the
same requests on `VLLMSteerer` and compare. `--plain-vllm SPEC` (in the vLLM venv) writes plain vLLM's
greedy tokens instead. No vLLM import at module level. A comparison tool, not part of the runtime: it sits
above both backends (it runs `Steerer` and plain vLLM), so it lives in benchmarks/, never under `steerer.engine`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steerer.constraints import Constraint
from steerer.policy import SteeringPolicy
from steerer.request import Request, Result, SamplingParams

PROMPTS = ("Name three colors.", "Describe the ocean in two sentences.", "Write a haiku about autumn leaves.",
           "Give me one tip for learning a new language.")
ALPHA = 24.0  # strong enough to change SmolLM2-135M's text within its first tokens on 3 of the 4 prompts


def parity_requests(max_new_tokens: int = 24):
    """Four prompts x (unsteered, constant steering on every constraint), three constraints each: one plain,
    one whose probe is conditioned on its params (a count limit), one that reads the lens of its words."""
    constraints = (Constraint("lowercase", {}), Constraint("word_count", {"relation": "at most", "limit": 20}),
                   Constraint("term_exclusion", {"terms": ["blue", "water"]}))
    out = []
    for i, prompt in enumerate(PROMPTS):
        for steered in (False, True):
            policy = SteeringPolicy("constant", ALPHA) if steered else SteeringPolicy()
            out.append(Request(prompt, constraints=constraints, policy=policy,
                               sampling=SamplingParams(max_new_tokens=max_new_tokens),
                               id=f"p{i}-{'s' if steered else 'u'}"))
    return out


def result_record(result: Result) -> dict:
    return {"id": result.request_id, "tokens": result.tokens, "text": result.text, "finish": result.finish_reason,
            "steered": result.steered_tokens, "prompt_tokens": result.prompt_tokens,
            "p_end": {v.task: v.p_satisfied_end for v in result.verdicts}, "traces": result.traces}


def plain_vllm_tokens(prompts: list[list[int]], max_new_tokens: int, llm_kwargs: dict) -> list[list[int]]:
    """Greedy tokens of plain vLLM (its own Llama, no plugin), each prompt run alone, EOS dropped: what a
    request that steers nothing must reproduce on the steerer architecture. Runs in the vLLM venv."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSampling

    from steerer.engine.vllm.driver import configure_environment, eos_ids

    configure_environment()
    llm = LLM(**llm_kwargs)
    eos = set(eos_ids(llm_kwargs["model"], llm.get_tokenizer()))
    out = []
    for ids in prompts:
        (result,) = llm.generate([{"prompt_token_ids": ids}], VLLMSampling(max_tokens=max_new_tokens, temperature=0.0),
                                 use_tqdm=False)
        out.append([t for t in result.outputs[0].token_ids if t not in eos])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--plain-vllm", metavar="JSON", help="instead: plain vLLM's greedy tokens for the prompts "
                        "(token-id lists) with the LLM kwargs in this file: {prompts, llm_kwargs}")
    args = parser.parse_args(argv)
    if args.plain_vllm:
        spec = json.loads(Path(args.plain_vllm).read_text())
        tokens = plain_vllm_tokens(spec["prompts"], args.max_new_tokens, spec["llm_kwargs"])
        Path(args.out).write_text(json.dumps(tokens))
        return
    from steerer.bank import ProbeBank
    from steerer.core import Steerer
    from steerer.model import load_model

    with Steerer(load_model(threads=1), ProbeBank.load(), record=True) as steerer:
        results = steerer.run(parity_requests(args.max_new_tokens))
    Path(args.out).write_text(json.dumps([result_record(r) for r in results]))


if __name__ == "__main__":
    main()
