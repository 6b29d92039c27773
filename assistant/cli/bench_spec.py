"""``assistant bench spec``: speculative decoding on the real models.

For a fixed set of prompts (a copy-heavy edit of a code file, a text to fix
and give back in full, a code edit that is part copy and part new, a summary
that quotes its source, open-ended chat) it runs, greedy and in one process,
plain decoding, each drafter, ``auto``, llama-cpp-python's own prompt lookup
(``Llama(draft_model=LlamaPromptLookupDecoding())``) and plain decoding with
llama.cpp's default F16 KV cache (``plain-f16-kv``: what runs when
speculative decoding is off; the engine's runs use a Q8_0 K cache, see
backends/llamacpp.py), alternating the
methods round by round (the machine's load drifts; medians are reported), and
prints tokens/s, the ratio to plain, the acceptance rate and whether the text
is identical to plain decoding.

The draft-model pair is built here from the one SmolLM2 file we have: a Q8_0
target requantized from the Q4_1 GGUF with llama.cpp's quantize (through
``llama_cpp.llama_model_quantize``), drafted for by the Q4_1 file itself.
It is made once in the cache dir (145 MB). Not F16: llama.cpp computes F16
weights differently in batches (tinyBLAS) than in one-token steps, so an F16
target's verify batches are never bit-identical to plain decoding (the
engine's calibration finds an exact batch of 1 and drafts nothing).

Goals (DESIGN.md machine: 2 cores, SmolLM2-135M Q4_1, greedy): copy >= 1.8x,
mixed edit >= 1.3x, open-ended with auto >= 0.97x, text identical to plain.

Nothing heavy is imported at module import time (the CLI builds its parser
from here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

GOALS = {"copy": 1.8, "mixed": 1.3, "open": 0.97}

CODE_FILE = '''class Inventory:
    """Items in stock, by name."""

    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        have = self.items.get(name, 0)
        if count > have:
            raise ValueError(f"only {have} {name} in stock")
        self.items[name] = have - count

    def total(self):
        return sum(self.items.values())

    def report(self):
        for name, count in sorted(self.items.items()):
            print(f"{name}: {count}")
'''

ARTICLE = (
    "The lighthouse at Point Reyes was built in 1870 and stands on a rocky headland about 300 feet above the "
    "Pacific Ocean. Its first-order Fresnel lens, made in France, has 24 panels and more than a thousand pieces "
    "of glass. For over a century the keepers climbed 308 steps every evening to light the lamp and wind the "
    "clockwork that turned the lens. The weather there is among the foggiest and windiest on the Pacific coast: "
    "winds of more than 100 miles per hour have been recorded, and fog can last for weeks in summer. In 1975 the "
    "Coast Guard replaced the old lens with an automated light, and the lighthouse became part of the Point "
    "Reyes National Seashore. Today visitors can walk down to the lighthouse on days when the wind is below 40 "
    "miles per hour."
)

# name -> (kind, prompt). kind: copy | mixed | open (which goal applies).
PROMPTS: dict[str, tuple[str, str]] = {
    "code-edit": ("copy", "Here is a Python file:\n\n```python\n" + CODE_FILE + "```\n\n"
                  "Add the comment line `# Stock keeping.` at the top of the file and output the whole file."),
    "text-fix": ("copy", "Fix the typo in this text and output the corrected text in full:\n\n"
                 + ARTICLE.replace("windiest", "windeist")),
    "code-docstrings": ("mixed", "Here is a Python file:\n\n```python\n" + CODE_FILE + "```\n\n"
                        "Add a docstring to every method and output the whole file."),
    "summary-quote": ("mixed", "Summarize this article in three sentences, quoting its key facts word for "
                      "word:\n\n" + ARTICLE),
    "open-chat": ("open", "What are some good habits for staying healthy? Answer in a few paragraphs."),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--model", default="smollm2-135m", help="target model (alias or GGUF path)")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-draft", type=int, default=None, help="default: the engine's")
    p.add_argument("--prompt", action="append", choices=sorted(PROMPTS), help="only these prompts (repeatable)")
    p.add_argument("--no-draft-model", action="store_true", help="skip the draft-model pair")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python's prompt lookup")
    p.add_argument("--mtp-model", default=None,
                   help="a separate MTP drafter (gemma4-assistant GGUF) for the mtp row; default: the config's "
                        "speculative.mtp_model, else an mtp-*.gguf beside the model that pairs with it")
    p.add_argument("--max-foreign", type=float, default=0.10,
                   help="rerun a run while other processes used more than this share of the CPUs (Linux); 1 = never")
    p.add_argument("--retries", type=int, default=6, help="most reruns of one noisy run")


class _CPU:
    """CPU time used by other processes during a run (Linux /proc), as a share of all CPUs."""

    @staticmethod
    def sample():
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            return sum(vals) - vals[3] - vals[4], int(own[11]) + int(own[12]), sum(vals)
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def foreign(a, b) -> float | None:
        if a is None or b is None or b[2] <= a[2]:
            return None
        return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))


# -- the draft-model pair ------------------------------------------------------


def requantized(source: Path, kind: str = "Q8_0") -> Path:
    """``source`` converted to ``kind`` (Q8_0 or F16) with llama.cpp's quantize
    (made once, in the cache dir)."""
    from assistant import paths

    out = paths.cache_dir() / "models" / f"{source.stem}.{kind}-requantized.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from backends.llamacpp import _llama

    C = _llama()
    params = C.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0, "F16": C.LLAMA_FTYPE_MOSTLY_F16, "Q4_0": C.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    rc = C.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({source} -> {kind}) failed with {rc}")
    tmp.rename(out)
    return out


# -- running -------------------------------------------------------------------


def _load(path: Path, args: argparse.Namespace, *, kv_type: str | None = "q8_0/f16",
          mtp_model: str | None = None):
    from backends.base import LoadOptions
    from backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend()
    extra = {"kv_type": kv_type} if kv_type else {}
    b.load(str(path), LoadOptions(n_ctx=args.context, n_threads=args.threads, extra=extra, mtp_model=mtp_model))
    return b


def _mtp_model(args: argparse.Namespace, config, spec, log) -> str | None:
    """The separate MTP drafter the ``mtp`` row uses, as the daemon would pick it
    (``--mtp-model``, the config's, else a sibling that pairs); each decision logged.
    A configured one that cannot be used is said, and the row runs without it."""
    from backends.base import ModelLoadError

    from assistant.daemon.drafts import mtp_model_for

    if args.mtp_model:
        from backends.mtp_pairing import check_assistant

        try:
            check_assistant(spec.path, args.mtp_model)
        except ModelLoadError as exc:
            log(f"mtp: --mtp-model not used: {exc}")
            return None
        return args.mtp_model
    if config is None:
        from assistant.config import Config

        config = Config()
    try:
        path, lines = mtp_model_for(config, args.model, spec, "mtp")
    except ModelLoadError as exc:
        log(f"mtp: the configured MTP drafter is not used: {exc}")
        return None
    for line in lines:
        log(f"mtp drafter: {line}")
    return path


def _ours(backend, prompt: list[int], engine, max_tokens: int) -> dict[str, Any]:
    from assistant.inference.generation import generate
    from assistant.inference.sampling import SamplingParams

    backend.truncate(0)
    r = generate(backend, prompt, SamplingParams(temperature=0), max_tokens=max_tokens, speculative=engine)
    s = r.stats
    return {"tokens": r.tokens, "tps": s.tokens_per_second or 0.0, "drafted": s.drafted, "accepted": s.accepted,
            "text": r.text}


class _Lookup:
    """llama-cpp-python's own prompt lookup decoding, on the same model file."""

    def __init__(self, path: Path, args: argparse.Namespace):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # n_batch = n_ctx: with a draft model Llama keeps logits for every position in
        # an array of n_batch rows (0.3.36), which overflows past n_batch tokens otherwise.
        self.llm = Llama(model_path=str(path), n_ctx=args.context, n_batch=args.context, n_threads=args.threads,
                         n_threads_batch=args.threads, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10),
                         verbose=False)

    def run(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        llm = self.llm
        llm.reset()
        t1 = None
        count = 0
        for _chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            count += 1
            if t1 is None:
                t1 = time.perf_counter()
        t2 = time.perf_counter()
        toks = [int(t) for t in llm._input_ids[len(prompt):]]
        eog = {int(llm.token_eos())}
        toks = [t for t in toks if t not in eog]
        tps = (count - 1) / (t2 - t1) if count > 1 and t1 is not None and t2 > t1 else 0.0
        return {"tokens": toks[:count], "tps": tps, "drafted": None, "accepted": None, "text": None}


def _engine(name: str, backend, args: argparse.Namespace, costs, draft_backend=None):
    """The engine the daemon would build for drafter ``name`` (None: plain),
    with the loaded model's cost model ``costs``."""
    from assistant.inference import speculative as S

    if name == "plain":
        return None
    kw = {} if args.max_draft is None else {"max_draft": args.max_draft}
    ctx = S.DraftContext(target=backend, draft=draft_backend,
                         draft_name="draft" if draft_backend is not None else None, **kw)
    return S.SpeculativeEngine(S.DrafterRegistry(S.BUILTIN_DRAFTERS).make(name, ctx), costs=costs, **kw)


def _calibration_store():
    """The calibration store the daemon uses (the user cache dir, keyed by this machine)."""
    from assistant import paths
    from assistant.inference import speculative as S
    from assistant.machine.hardware import probe

    machine = probe()
    return S.CalibrationStore.in_cache(paths.cache_dir(), platform_tag=machine.platform_tag,
                                       cpu_model=machine.cpu_model)


def _section(title: str, backend, methods: list[str], prompts: list[str], args: argparse.Namespace,
             *, draft_backend=None, lookup: "_Lookup | None" = None, default_kv=None, log=print) -> dict[str, Any]:
    from assistant.inference import speculative as S

    # Calibrate the exact verify batch and the costs before timing anything;
    # every engine of the section then shares (and refines) these costs.
    probe = backend.tokenize(ARTICLE, add_bos=False)
    backend.truncate(0)
    cm = S.calibrate(backend, probe, S.MAX_DRAFT_LIMIT + 1, store=_calibration_store())
    rows: list[dict[str, Any]] = []
    for pname in prompts:
        kind, text = PROMPTS[pname]
        prompt = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": text}]))
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for rnd in range(args.repeat):
            for m in methods:
                for attempt in range(args.retries + 1):
                    before = _CPU.sample()
                    if m == "llama-cpp-lookup":
                        res = lookup.run(prompt, args.max_tokens)
                    elif m == "plain-f16-kv":
                        res = _ours(default_kv, prompt, None, args.max_tokens)
                    else:
                        res = _ours(backend, prompt, _engine(m, backend, args, cm, draft_backend), args.max_tokens)
                    res["foreign_cpu"] = _CPU.foreign(before, _CPU.sample())
                    res["retries"] = attempt
                    if res["foreign_cpu"] is None or res["foreign_cpu"] <= args.max_foreign:
                        break
                    log(f"  [{title}] {pname} {m}: other processes used {res['foreign_cpu']:.0%} of the CPUs; "
                        "running it again")
                    time.sleep(2.0)
                runs[m].append(res)
                fc = f", other processes {res['foreign_cpu']:.0%}" if res["foreign_cpu"] is not None else ""
                log(f"  [{title}] {pname} round {rnd + 1} {m}: {res['tps']:.1f} tok/s{fc}")
        plain_tps = statistics.median(r["tps"] for r in runs["plain"])
        plain_tokens = runs["plain"][0]["tokens"]
        for m in methods:
            rs = runs[m]
            tps = statistics.median(r["tps"] for r in rs)
            drafted = sum(r["drafted"] or 0 for r in rs)
            accepted = sum(r["accepted"] or 0 for r in rs)
            rows.append({
                "section": title, "prompt": pname, "kind": kind, "method": m,
                "tokens": len(rs[0]["tokens"]), "tokens_per_second": round(tps, 1),
                "ratio": round(tps / plain_tps, 3) if plain_tps else None,
                "acceptance": round(accepted / drafted, 3) if drafted else None,
                "drafted_per_run": round(drafted / len(rs), 1) if rs[0]["drafted"] is not None else None,
                # plain-f16-kv is another KV cache arithmetic: its text may differ, and is not compared
                "identical": None if m == "plain-f16-kv" else all(r["tokens"] == plain_tokens for r in rs),
                "tps_runs": [round(r["tps"], 1) for r in rs],
                "foreign_cpu": [None if r["foreign_cpu"] is None else round(r["foreign_cpu"], 3) for r in rs],
                "reruns": sum(r["retries"] for r in rs),
            })
    kv = backend.info.choices.get("kv_cache")
    if cm.exact_batch is not None and cm.exact_batch < cm.calibrated_to:
        why = (f"batches of 2..{cm.exact_batch} gave logits bit-identical to one-token steps, {cm.calibrated_to} did "
               f"not (KV cache {kv}); drafts are at most {cm.exact_batch - 1} tokens")
    else:
        why = f"every batch size tried (up to {cm.calibrated_to}) was exact (KV cache {kv})"
    return {"title": title, "rows": rows, "exact_batch": cm.exact_batch, "calibrated_to": cm.calibrated_to,
            "exact_batch_why": why,
            "step_ms": round(cm.step_cost() * 1000, 2),
            # what a verify batch of n tokens cost in plain steps, as measured over the runs:
            # it bounds what any drafter can gain on this machine
            "verify_cost_steps": {n: round(cm.verify_cost(n) / cm.step_cost(), 2) for n in (2, 4, 8, 16, 32)}}


def _goal_check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["section"] != "main":
            continue
        want = GOALS[r["kind"]]
        if r["kind"] == "open" and r["method"] != "auto":
            continue
        if r["kind"] != "open" and r["method"] not in ("ngram", "auto"):
            continue
        out.append({"prompt": r["prompt"], "method": r["method"], "kind": r["kind"], "goal": want,
                    "ratio": r["ratio"], "met": bool(r["ratio"] is not None and r["ratio"] >= want
                                                     and r["identical"])})
    return out


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def run(args: argparse.Namespace) -> int:
    from assistant.config import load_config
    from assistant.config.models import resolve_model

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    try:
        config = load_config()
    except Exception:  # noqa: BLE001 - the bench does not need the user's config to be valid
        config = None
    spec = resolve_model(args.model, config)
    prompts = args.prompt or list(PROMPTS)
    load_before = os.getloadavg()
    started = time.time()
    report: dict[str, Any] = {"model": args.model, "path": str(spec.path), "threads": args.threads,
                              "max_tokens": args.max_tokens, "repeat": args.repeat, "sections": []}

    log(f"loading {args.model} ({spec.path})")
    target = _load(spec.path, args, mtp_model=_mtp_model(args, config, spec, log))
    # What plain decoding runs on without speculative decoding: llama.cpp's F16 KV cache.
    default_kv = _load(spec.path, args, kv_type=None)
    lookup = None
    methods = ["plain", "ngram", "auto", "plain-f16-kv"]
    mtp_ok, mtp_why = target.mtp_support()
    report["mtp"] = mtp_why
    report["mtp_kind"] = target.mtp_kind()  # "nextn", "assistant" or None
    if mtp_ok:
        methods.insert(2, "mtp")
        log(f"mtp: run with {mtp_why}")
    else:
        log(f"mtp: not run: {mtp_why}")
    if not args.no_llama_cpp:
        lookup = _Lookup(spec.path, args)
        methods.append("llama-cpp-lookup")
    report["sections"].append(_section("main", target, methods, prompts, args, lookup=lookup,
                                       default_kv=default_kv, log=log))
    target.unload()
    default_kv.unload()
    del lookup

    if not args.no_draft_model:
        report["sections"].append(_draft_pair_section(Path(spec.path), prompts, args, log))

    report["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    report["seconds"] = round(time.time() - started, 1)
    rows = [r for s in report["sections"] for r in s["rows"]]
    report["goals"] = _goal_check(rows)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _draft_pair_section(path: Path, prompts: list[str], args: argparse.Namespace, log) -> dict[str, Any]:
    """The ``draft`` drafter on the pair made from one file (see the module doc)."""
    from assistant.inference.speculative import check_draft_pair

    log("draft-model pair: a Q8_0 target requantized from the file, the file itself as draft")
    q8 = requantized(path, "Q8_0")
    big = _load(q8, args)
    small = _load(path, args, kv_type=None)
    try:
        check_draft_pair(big, small)
        sec = _section("draft-pair", big, ["plain", "draft", "auto"], prompts, args, draft_backend=small, log=log)
        sec["target"], sec["draft"] = str(q8), str(path)
        return sec
    finally:
        big.unload()
        small.unload()


def _print_table(report: dict[str, Any]) -> None:
    """The report as the tables ``assistant bench spec`` prints without --json."""
    print()
    for s in report["sections"]:
        costs = ", ".join(f"{n}: {c}" for n, c in s["verify_cost_steps"].items())
        print(f"== {s['title']}  (exact verify batch {s['exact_batch']}, plain step {s['step_ms']} ms; "
              f"verify batch cost in plain steps by size: {costs})")
        print(f"   exact-batch limit: {s.get('exact_batch_why', '-')}")
        print(f"{'prompt':<16} {'kind':<6} {'method':<17} {'tok/s':>7} {'ratio':>6} {'accept':>7} "
              f"{'drafted':>8} {'identical':>9} {'tokens':>6} {'other CPU':>9}")
        for r in s["rows"]:
            acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
            dr = f"{r['drafted_per_run']:.0f}" if r["drafted_per_run"] is not None else "-"
            fc = [x for x in r["foreign_cpu"] if x is not None]
            other = f"{max(fc):.0%}" if fc else "-"
            print(f"{r['prompt']:<16} {r['kind']:<6} {r['method']:<17} {r['tokens_per_second']:>7.1f} "
                  f"{r['ratio']:>6.2f} {acc:>7} {dr:>8} {_yes(r['identical']):>9} {r['tokens']:>6} "
                  f"{other:>9}")
        print()
    print(f"mtp: {'run' if any(r['method'] == 'mtp' for s in report['sections'] for r in s['rows']) else 'not run'}"
          f" ({report['mtp']})")
    print("goals:", ", ".join(f"{g['prompt']}/{g['method']} {g['ratio']:.2f}x (>= {g['goal']}) "
                              f"{'met' if g['met'] else 'NOT met'}" for g in report["goals"]))
    la = report["load_average"]
    print(f"load average before {la['before']}, after {la['after']}; {report['seconds']} s; "
          "other CPU: the most any run's other processes used (runs above --max-foreign were rerun)")
