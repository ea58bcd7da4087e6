"""Load shortened checkpoints in the real vLLM engine, one after another in one process (imports paid once).

    python tests/vllm_families.py DIR[=DTYPE] [DIR[=DTYPE] ...]

For each folder: 6 greedy tokens, and the log-probability vLLM gives each token of a fixed prompt (prompt
logprobs), in DTYPE (default float32). Prints one JSON line per folder: {"path", "ok", "tokens",
"prompt_logprobs" | "error"}. Used by tests/test_families_vllm.py.
"""

from __future__ import annotations

import gc
import json
import os
import sys

PROMPT_IDS = [5, 17, 101, 42, 250, 7, 99, 3, 64, 128, 11, 200]


def main(specs: list[str]) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    for spec in specs:
        path, _, dtype = spec.partition("=")
        try:
            llm = LLM(model=path, dtype=dtype or "float32", enforce_eager=True, max_model_len=128, seed=0)
            out = llm.generate(["The sea"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
            scored = llm.generate(
                [{"prompt_token_ids": PROMPT_IDS}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
            )
            logprobs = [
                None if position is None else position[token].logprob
                for token, position in zip(PROMPT_IDS, scored[0].prompt_logprobs or [], strict=True)
            ]
            result = {
                "path": path,
                "ok": True,
                "tokens": len(out[0].outputs[0].token_ids),
                "prompt_logprobs": logprobs,
            }
            del llm
        except Exception as exc:  # report and go on to the next family
            result = {"path": path, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        gc.collect()
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
