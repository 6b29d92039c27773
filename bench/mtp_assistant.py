"""A Gemma 4 request with its random-weight MTP drafter on (controller on)
against the same request with drafting off: the speed ratio.

    python bench/mtp_assistant.py [--tokens 200] [--rounds 3] [--embd 64 --layers 4] [--threads 2] [--forget]

The issue's failure mode: MTP that makes Gemma 4 slower. A drafter with
random weights accepts (almost) nothing, so the adaptive controller must
switch it off and the request must run at >= 0.97x plain. No real Gemma 4
weights are reachable here: the script writes a random ``gemma4`` target
(``--embd``/``--layers``: the default is the tests' tiny one; a larger one
makes a step cost more like a real model's, where the per-step Python
overhead weighs less) and a 2-layer ``gemma4-assistant``
(tests/gemma4_files.py), then runs, alternating round by round:

- ``off``: the target loaded without a drafter, plain decoding (what the
  daemon runs with ``drafter: off``);
- ``mtp``: the target loaded with the assistant (``LoadOptions.mtp_model``),
  the ``mtp`` drafter under the adaptive controller (what the daemon runs
  with ``drafter: mtp``).

Both with the Q8_0 K cache the daemon uses when drafting, greedy, the end of
generation suppressed so that each run makes exactly ``--tokens`` tokens.
The ``mtp`` rounds share one ``CostModel`` (costs and the drafter's measured
acceptance, ``CostModel.acceptance``), as the requests of one loaded model do
in the daemon (``worker.costs``): the first round learns that the drafter
accepts nothing, the later ones start with it switched off and only probe
(``--forget``: every round learns alone, as requests did before).
Prints per round tokens/s, the ratio and what was drafted; then the medians.
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

from gemma4_files import AssistantShape, Gemma4Shape, write_assistant, write_target  # noqa: E402

from assistant.inference import speculative as S  # noqa: E402
from assistant.inference.generation import generate  # noqa: E402
from assistant.inference.speculative.costs import AcceptanceMemory  # noqa: E402
from assistant.inference.sampling import SamplingParams  # noqa: E402
from backends.base import LoadOptions  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402

PROMPT = "the tea is in the hat then the rain is in the tea"


def _files(d: Path, embd: int, layers: int) -> tuple[Path, Path]:
    pattern = tuple(i % 2 == 0 for i in range(layers))  # SWA, full, ...: ends [True, False] for an even count
    shape = Gemma4Shape(n_embd=embd, n_layer=layers, n_ff=2 * embd, swa_pattern=pattern,
                        n_head=max(2, embd // 64), head_dim=64, head_dim_swa=32)
    target = write_target(d / "gemma4-bench.gguf", shape)
    drafter = write_assistant(d / "mtp-gemma4-bench.gguf", AssistantShape.for_target(shape, n_embd=max(32, embd // 4)))
    return target, drafter


def _load(path: Path, threads: int, mtp_model: Path | None) -> LlamaCppBackend:
    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=2048, n_threads=threads, mtp_model=str(mtp_model) if mtp_model else None,
                                  extra={"kv_type": "q8_0/f16", "mtp": mtp_model is not None}))
    return b


def _run(b: LlamaCppBackend, prompt: list[int], tokens: int, engine) -> tuple[float, int, int, list[int]]:
    b.truncate(0)
    r = generate(b, prompt, SamplingParams(temperature=0), max_tokens=tokens, speculative=engine, ignore_eos=True)
    return r.stats.tokens_per_second or 0.0, r.stats.drafted, r.stats.accepted, r.tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--embd", type=int, default=64, help="the target's hidden size (the tests' tiny model: 64)")
    ap.add_argument("--layers", type=int, default=4, help="the target's layers (even)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forget", action="store_true",
                    help="each round starts without the earlier rounds' acceptance (a request learning alone)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target, drafter = _files(Path(tmp), args.embd, args.layers)
        off, on = _load(target, args.threads, None), _load(target, args.threads, drafter)
        prompt = off.tokenize(off.apply_chat_template([{"role": "user", "content": PROMPT}]))
        # What the daemon measures once per model file and machine (its engines verify
        # up to max_draft + 1 tokens), so that no round pays for it.
        costs = S.calibrate(on, prompt, S.DEFAULT_MAX_DRAFT + 1)
        results: dict[str, list[float]] = {"off": [], "mtp": [], "ratio": []}
        drafted = accepted = 0
        for rnd in range(args.rounds):
            tps_off, _, _, toks_off = _run(off, prompt, args.tokens, None)
            if args.forget:
                costs.acceptance = AcceptanceMemory()
            engine = S.SpeculativeEngine(S.MtpDrafter(on), costs=costs)  # one CostModel: the worker's
            tps_on, d, a, toks_on = _run(on, prompt, args.tokens, engine)
            same = "identical" if toks_on == toks_off else "DIFFERENT"
            results["off"].append(tps_off)
            results["mtp"].append(tps_on)
            results["ratio"].append(tps_on / tps_off if tps_off else 0.0)
            drafted, accepted = drafted + d, accepted + a
            sp = engine.verify
            print(f"round {rnd + 1}: off {tps_off:.1f} tok/s, mtp {tps_on:.1f} tok/s, ratio {results['ratio'][-1]:.3f} "
                  f"(drafted {d}, accepted {a}, {sp.verify_steps} verify steps, {sp.probes} probes, "
                  f"{sp.draft_ms + sp.verify_ms:.1f} ms drafting and verifying, text {same})")
        med_off, med_on = statistics.median(results["off"]), statistics.median(results["mtp"])
        print(f"target E={args.embd} L={args.layers}, {args.tokens} tokens, {args.threads} threads: "
              f"off {med_off:.1f} tok/s, mtp (controller on) {med_on:.1f} tok/s, ratio of medians "
              f"{med_on / med_off:.3f}, median of round ratios {statistics.median(results['ratio']):.3f}; "
              f"drafted {drafted}, accepted {accepted} over {args.rounds} rounds")
        on.unload()
        off.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
