"""Structured output: what the grammar costs.

    python bench/structured_output.py [--model smollm2-135m] [--tokens 160] [--threads 2] [--no-engines]

One run, printed side by side:

1. decode tokens/s of the shared generation loop (``generate``) with no
   constraint, with a JSON Schema (greedy: the grammar's mask is computed
   only where the model's own pick is not allowed), and with the schema at
   temperature 0.8 (the full mask every token);
2. unless ``--no-engines``: the two engines this project could constrain
   with, per token of a greedy constrained reply: llguidance (replaying the
   reply of 1.: the mask of the whole vocabulary, and the one-token check)
   and llama.cpp's grammar sampler (``llama_sampler_init_grammar`` over
   llama-cpp-python's json-schema-to-grammar, applied to the whole
   vocabulary, as a sampler chain does when the grammar comes first, on a
   greedy reply of its own). Milliseconds per token, model time excluded.

The schema has enums, a nested object, an array and required keys. Figures
depend on the machine and on what else runs on it; this script asserts
nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from assistant.config.models import resolve_model  # noqa: E402
from assistant.inference.constraints import constraint_for, parse_response_format  # noqa: E402
from assistant.inference.generation import generate  # noqa: E402
from assistant.inference.sampling import SamplingParams  # noqa: E402
from backends.base import LoadOptions  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
PROMPT = "Make up a JSON record of a person: name, age, role, address and tags."


def decode_rates(b: LlamaCppBackend, prompt: list[int], max_tokens: int) -> tuple[list[int], dict[str, tuple]]:
    """(the greedy constrained reply's tokens, {case: (tokens/s, tokens, finish)})."""
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    cases = {
        "no constraint, greedy": SamplingParams(temperature=0),
        "schema, greedy": SamplingParams(temperature=0, response_format=fmt),
        "schema, temperature 0.8": SamplingParams(temperature=0.8, seed=1, response_format=fmt),
    }
    out, reply = {}, []
    b.truncate(0)
    generate(b, prompt, cases["no constraint, greedy"], max_tokens=4)  # warm up (first-call costs)
    for name, params in cases.items():
        b.truncate(0)
        r = generate(b, prompt, params, max_tokens=max_tokens)
        out[name] = (r.stats.tokens_per_second, r.stats.completion_tokens, r.finish_reason)
        if name == "schema, greedy":
            reply = r.tokens
    return reply, out


def llguidance_ms(b: LlamaCppBackend, reply: list[int]) -> tuple[float, float, float]:
    """(build ms, mask ms/token, one-token check ms/token) replaying ``reply``."""
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    t0 = time.perf_counter()
    c = constraint_for(fmt, b)
    build = time.perf_counter() - t0
    mask = check = 0.0
    for tok in reply:
        t1 = time.perf_counter()
        allowed = c.allowed()
        t2 = time.perf_counter()
        c.allows(tok)
        t3 = time.perf_counter()
        assert allowed[tok]
        c.take(tok)
        mask, check = mask + t2 - t1, check + t3 - t2
    n = max(1, len(reply))
    return build * 1000, mask * 1000 / n, check * 1000 / n


def llamacpp_grammar_ms(b: LlamaCppBackend, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(build ms, apply+accept ms/token, tokens) for llama.cpp's grammar sampler, on a
    greedy reply of its own: llama-cpp-python's converter writes compact JSON
    (``space ::= " "?``), so it cannot replay llguidance's reply. Only the sampler's
    calls are timed. Reaches into the backend for its llama_vocab: a measurement,
    not an interface."""
    from llama_cpp import llama_cpp as C
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    t0 = time.perf_counter()
    gbnf = json_schema_to_gbnf(json.dumps(SCHEMA))
    smpl = C.llama_sampler_init_grammar(b._vocab._vocab, gbnf.encode(), b"root")
    build = time.perf_counter() - t0
    n = b.info.vocab_size
    data = (C.llama_token_data * n)()
    arr = C.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    view = np.frombuffer(data, dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
    ids = np.arange(n, dtype=np.int32)
    spent, done = 0.0, 0
    b.truncate(0)
    row = b.forward(prompt)[-1]
    try:
        for _ in range(max_tokens):
            view["id"], view["logit"], view["p"] = ids, row, 0.0
            arr.size, arr.selected, arr.sorted = n, -1, False
            t1 = time.perf_counter()
            C.llama_sampler_apply(smpl, ctypes.byref(arr))
            tok = int(view["id"][int(np.argmax(view["logit"][: arr.size]))])
            C.llama_sampler_accept(smpl, tok)
            spent += time.perf_counter() - t1
            done += 1
            if b.is_eog(tok):
                break
            row = b.forward((tok,))[-1]
    finally:
        C.llama_sampler_free(smpl)
    return build * 1000, spent * 1000 / max(1, done), done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=160, help="max tokens per reply")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-engines", action="store_true", help="skip the llguidance vs llama.cpp grammar replay")
    args = ap.parse_args()
    b = LlamaCppBackend()
    b.load(str(resolve_model(args.model).path), LoadOptions(n_ctx=2048, n_threads=args.threads))
    try:
        prompt = b.tokenize(b.apply_chat_template([{"role": "user", "content": PROMPT}]))
        reply, rates = decode_rates(b, prompt, args.tokens)
        print(f"{'case':<28} {'tokens/s':>9} {'tokens':>7}  finish")
        for name, (tps, n, finish) in rates.items():
            print(f"{name:<28} {tps if tps is not None else float('nan'):>9.1f} {n:>7}  {finish}")
        if not args.no_engines and reply:
            build, mask, check = llguidance_ms(b, reply)
            print(f"\nllguidance over {len(reply)} tokens: build {build:.1f} ms (vocabulary cached), "
                  f"mask {mask:.3f} ms/token, one-token check {check:.3f} ms/token")
            build, per, done = llamacpp_grammar_ms(b, prompt, args.tokens)
            print(f"llama.cpp grammar sampler over {done} tokens: build {build:.1f} ms, "
                  f"apply over the vocabulary + accept {per:.3f} ms/token")
    finally:
        b.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
