"""Generate from the command line with the in-process engine, streaming text as it is accepted.

    python -m cluster.cli --config configs/default.yaml "def fibonacci(n):"
"""

from __future__ import annotations

import argparse
import sys
import time

from cluster.config import load_config
from cluster.engine import SpecEngine
from cluster.types import FinalDelta
from cluster.errors import SpecDecError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        engine = SpecEngine(load_config(args.config))
        prompt = args.prompt
        if args.chat:
            messages = [{"role": "user", "content": prompt}]
            prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        overrides = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                       ("seed", args.seed)) if v is not None}
        start = time.perf_counter()
        for delta in engine.stream(prompt, engine.default_params(**overrides)):
            print(delta.text, end="", flush=True)
            if isinstance(delta, FinalDelta):
                final = delta
    except SpecDecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    s = final.stats
    print(
        f"\n\n[finish={final.finish_reason} prompt_tokens={final.prompt_tokens} "
        f"completion_tokens={final.completion_tokens} target_passes={s.steps} drafted={s.drafted} "
        f"accepted={s.accepted} acceptance={s.acceptance_rate:.2f} "
        f"tokens/pass={final.completion_tokens / max(s.steps, 1):.2f} tokens/s={final.completion_tokens / elapsed:.1f}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
