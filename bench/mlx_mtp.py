"""Gemma 4 on MLX with its MTP assistant: decode speed with the drafter on
(controller on, as the daemon runs it) against plain decoding.

    python bench/mlx_mtp.py [--target DIR --assistant DIR] [--tokens 200] [--repeat 3]

Without ``--target`` it writes the tiny random-weight pair the tests use
(tests/mlx_gemma4_files.py): the target then accepts almost none of the
drafts, so the figure says what the controller saves when MTP does not pay
(the issue asks for >= 0.97x plain), not what a trained assistant gains.
Both runs share one loaded model and one CostModel (costs and the drafter's
measured acceptance, ``CostModel.acceptance``), as requests in the daemon do;
the first (warm-up) request of each kind is not counted: it is the one that
learns the drafter accepts nothing. Reported: decode tokens/s (first
generated token to last), drafted/accepted, per run and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant.inference import speculative as S  # noqa: E402
from assistant.inference.generation import generate  # noqa: E402
from assistant.inference.sampling import SamplingParams  # noqa: E402
from backends.base import LoadOptions  # noqa: E402
from backends.mlx_backend import MLXBackend  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="an MLX Gemma 4 folder (default: a tiny random one)")
    ap.add_argument("--assistant", help="its gemma4_assistant folder")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-draft", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target, assistant = args.target, args.assistant
        if target is None:
            from mlx_gemma4_files import write_assistant, write_target

            target, assistant = str(write_target(Path(tmp) / "t")), str(write_assistant(Path(tmp) / "a"))
        b = MLXBackend()
        b.load(target, LoadOptions(n_ctx=args.tokens + 256, mtp_model=assistant))
        prompt = b.tokenize(b.apply_chat_template([{"role": "user", "content": PROMPT}]))
        costs = S.CostModel()
        rates: dict[str, list[float]] = {"plain": [], "mtp": [], "ratio": []}
        for i in range(args.repeat + 1):
            for mode in ("plain", "mtp"):
                engine = S.SpeculativeEngine(S.MtpDrafter(b), costs=costs, max_draft=args.max_draft) \
                    if mode == "mtp" else None
                b.truncate(0)
                r = generate(b, prompt, SamplingParams(temperature=0), max_tokens=args.tokens, ignore_eos=True,
                             speculative=engine)
                if i:
                    rates[mode].append(r.stats.tokens_per_second or 0.0)
                    if mode == "mtp":
                        ratio = rates["mtp"][-1] / rates["plain"][-1] if rates["plain"][-1] else 0.0
                        rates["ratio"].append(ratio)
                        print(f"run {i}: plain {rates['plain'][-1]:.1f} tok/s, mtp {rates['mtp'][-1]:.1f} tok/s, "
                              f"ratio {ratio:.3f}; drafted {r.stats.drafted}, accepted {r.stats.accepted}, "
                              f"{r.stats.speculative}")
        plain, mtp = statistics.median(rates["plain"]), statistics.median(rates["mtp"])
        print(f"plain {plain:.1f} tok/s, mtp (controller on) {mtp:.1f} tok/s: {mtp / plain:.3f}x, median of run "
              f"ratios {statistics.median(rates['ratio']):.3f} ({args.tokens} tokens, median of {args.repeat})")
        b.unload()


if __name__ == "__main__":
    main()
