"""Our speculative decoding against llama.cpp's own llama-server, side by side.

    .venv/bin/python bench/spec_vs_llama_server.py [--llama-server PATH | --build] [--rounds 6]

Same model file (the embedded SmolLM2-135M GGUF unless --model), same threads
(2), greedy, the same prompt tokens (our chat template, sent to llama-server's
/completion as token ids). Three prompts: copy a passage back (fix typos and
give the text in full), edit code (add type hints, output the whole file), an
open story. llama-server runs plain, ``--spec-type ngram-simple``,
``ngram-map-k`` and ``ngram-mod`` (flag names of the llama.cpp that
llama-cpp-python 0.3.36 vendors, common/arg.cpp); a fresh server per mode and
round, so ngram-mod's table (shared across requests) holds no earlier run's
reply. Ours runs our llama.cpp backend in-process through the same engine the
daemon uses, ``--draft off`` (plain), ``ngram`` and ``auto``. Modes alternate
within each round; medians over ``--rounds``.

Printed per cell: decode tokens/s as each side reports it (llama-server's
``timings.predicted_per_second``; ours the stats' ``tokens_per_second``), the
ratio to that side's own plain decoding, whether the text is identical to that
side's plain decoding (ours: plain decoding on the drafting backend's Q8_0 K cache, which
drafting must reproduce token for token), and accepted/drafted (summed over rounds).

The binary: ``--llama-server PATH``; else the one scripts/build-llama-server
built for the installed llama-cpp-python (~/.cache/assistant-build/); else with
``--build`` that script is run (about 10 minutes on 2 cores). Without a binary
it says so and runs our side alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PASSAGE = (
    "The old harbour town woke slowly in winter. Before dawn the fishing boats slipped out past the breakwater, "
    "their lamps swinging in the swell, and the gulls followed them out to sea. By eight the bakery on the corner "
    "of Water Street had its shutters up and the smell of bread drifted down to the quay. The ferry from the "
    "mainland arrived at ten, bringing the post, a few tourists in heavy coats and the doctor, who came over twice "
    "a week. In the afternoon the light failed early. The lighthouse on the point was lit at four, and its beam "
    "swept across the roofs of the town every twelve seconds, as it had done for more than a hundred years. "
    "In spring everything changed. The boats stayed out longer, the cafes on the harbour put their tables on the "
    "pavement, and the first sailing yachts came in from the south. Children fished for crabs from the steps of the "
    "old customs house, and on Sundays a brass band played in the square by the church until the evening."
)

CODE = '''def parse_line(line, sep=","):
    parts = line.strip().split(sep)
    return [p.strip() for p in parts if p]


def average(values):
    if not values:
        return 0.0
    return sum(values) / len(values)


def load_scores(path):
    scores = {}
    with open(path) as f:
        for line in f:
            name, *rest = parse_line(line)
            scores[name] = [float(x) for x in rest]
    return scores


def best_student(scores):
    return max(scores, key=lambda name: average(scores[name]))
'''

PROMPTS = {
    "copy": "Fix any typos in this text and output the text in full:\n\n" + PASSAGE,
    "edit": "Add type hints to every function in this Python code and output the whole code:\n\n```python\n"
            + CODE + "```",
    "open": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}

SERVER_MODES = {"server-plain": None, "ngram-simple": "ngram-simple", "ngram-map-k": "ngram-map-k",
                "ngram-mod": "ngram-mod"}
OUR_MODES = ("off", "ngram", "auto")


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def find_server(args) -> tuple[str | None, str]:
    """(binary or None, how it was found or why not)."""
    if args.llama_server:
        p = Path(args.llama_server).expanduser()
        return (str(p), "--llama-server") if os.access(p, os.X_OK) else (None, f"{p} is not an executable")
    version = installed_version()
    if version:
        base = Path(os.environ.get("ASSISTANT_BUILD_DIR", Path.home() / ".cache" / "assistant-build"))
        built = base / f"llama-server-{version}" / "llama-server"
        if os.access(built, os.X_OK):
            return str(built), f"built by scripts/build-llama-server for llama-cpp-python {version}"
    if args.build:
        r = subprocess.run([str(ROOT / "scripts" / "build-llama-server"), "--python", sys.executable],
                           stdout=subprocess.PIPE, text=True)
        lines = r.stdout.strip().splitlines()
        if r.returncode == 0 and lines:
            return lines[-1], "built now by scripts/build-llama-server"
        return None, f"scripts/build-llama-server failed ({r.returncode})"
    return None, "no llama-server binary (pass --llama-server PATH, or --build to build one)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One llama-server process on loopback."""

    def __init__(self, binary: str, model: str, args, spec_type: str | None):
        self.port = _free_port()
        cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(args.threads),
               "-tb", str(args.threads), "-c", str(args.context), "-np", "1", "--no-webui", "--no-warmup"]
        if spec_type:
            cmd += ["--spec-type", spec_type]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def complete(self, prompt: list[int], max_tokens: int) -> dict:
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
                           "cache_prompt": False, "return_tokens": True, "stream": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        t = out.get("timings", {})
        return {"tps": float(t.get("predicted_per_second") or 0.0), "text": out.get("content", ""),
                "tokens": out.get("tokens"), "drafted": t.get("draft_n"), "accepted": t.get("draft_n_accepted")}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Ours:
    """Our llama.cpp backend and speculative engine, as the daemon runs them."""

    def __init__(self, model: str, args):
        from backends.base import LoadOptions
        from backends.llamacpp import LlamaCppBackend

        from assistant.cli.bench_spec import _calibration_store
        from assistant.inference import speculative as S

        self.S = S
        self.plain = LlamaCppBackend()  # drafting off: llama.cpp's default F16 KV cache, as the daemon loads it
        self.plain.load(model, LoadOptions(n_ctx=args.context, n_threads=args.threads))
        self.spec = LlamaCppBackend()  # drafting on: Q8_0 K (exact verify batches), as the daemon loads it
        self.spec.load(model, LoadOptions(n_ctx=args.context, n_threads=args.threads,
                                          extra={"kv_type": S.DRAFTING_KV_TYPE}))
        self.costs = S.CostModel()
        self.store = _calibration_store()
        # The exact verify batch and the costs, measured (or read from the store) before timing.
        S.calibrate(self.spec, self.spec.tokenize(PASSAGE, add_bos=False), S.MAX_DRAFT_LIMIT + 1,
                    costs=self.costs, store=self.store)

    def reference(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Plain greedy decoding on the drafting backend (its KV cache): what a drafter must reproduce."""
        from assistant.inference.generation import generate
        from assistant.inference.sampling import SamplingParams

        self.spec.truncate(0)
        return generate(self.spec, prompt, SamplingParams(temperature=0), max_tokens=max_tokens).tokens

    def tokens(self, text: str) -> list[int]:
        b = self.spec
        return b.tokenize(b.apply_chat_template([{"role": "user", "content": text}]))

    def run(self, mode: str, prompt: list[int], max_tokens: int) -> dict:
        from assistant.inference.generation import generate
        from assistant.inference.sampling import SamplingParams

        S = self.S
        engine = None
        b = self.plain if mode == "off" else self.spec
        if mode != "off":
            drafter = S.DrafterRegistry(S.BUILTIN_DRAFTERS).make(mode, S.DraftContext(target=b))
            engine = S.SpeculativeEngine(drafter, costs=self.costs, calibration=self.store)
        b.truncate(0)
        r = generate(b, prompt, SamplingParams(temperature=0), max_tokens=max_tokens, speculative=engine)
        return {"tps": r.stats.tokens_per_second or 0.0, "text": r.text, "tokens": r.tokens,
                "drafted": r.stats.drafted, "accepted": r.stats.accepted}

    def close(self) -> None:
        self.plain.unload()
        self.spec.unload()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", help="path of a llama-server binary")
    ap.add_argument("--build", action="store_true", help="build llama-server if none is found (scripts/build-llama-server)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", action="append", choices=sorted(PROMPTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from assistant.config.models import resolve_model

    model = str(resolve_model(args.model).path)
    binary, why = find_server(args)
    print(f"model: {model}\nllama-server: {binary or 'none'} ({why})", file=sys.stderr)
    if binary is None:
        print("llama-server: not run; our side alone", file=sys.stderr)
    names = args.prompt or list(PROMPTS)
    ours = Ours(model, args)
    prompts = {n: ours.tokens(PROMPTS[n]) for n in names}
    refs = {n: ours.reference(prompts[n], args.max_tokens) for n in names}
    modes = list(OUR_MODES) + (list(SERVER_MODES) if binary else [])
    runs: dict[tuple[str, str], list[dict]] = {(n, m): [] for n in names for m in modes}
    try:
        for rnd in range(args.rounds):
            for m in modes:
                if m in SERVER_MODES:
                    srv = Server(binary, model, args, SERVER_MODES[m])
                    try:
                        for n in names:
                            runs[n, m].append(srv.complete(prompts[n], args.max_tokens))
                    finally:
                        srv.close()
                else:
                    for n in names:
                        runs[n, m].append(ours.run(m, prompts[n], args.max_tokens))
                print(f"round {rnd + 1} {m}: " + ", ".join(f"{n} {runs[n, m][-1]['tps']:.1f}" for n in names),
                      file=sys.stderr)
    finally:
        ours.close()

    rows = []
    for n in names:
        for m in modes:
            rs = runs[n, m]
            base = runs[n, "server-plain" if m in SERVER_MODES else "off"]
            tps = statistics.median(r["tps"] for r in rs)
            plain_tps = statistics.median(r["tps"] for r in base)
            ref = base[0] if m in SERVER_MODES or m == "off" else {"tokens": refs[n], "text": None}
            same = all((r["tokens"] == ref["tokens"]) if r["tokens"] is not None and ref["tokens"] is not None
                       else r["text"] == ref["text"] for r in rs)
            drafted = sum(r["drafted"] or 0 for r in rs)
            accepted = sum(r["accepted"] or 0 for r in rs)
            rows.append({"prompt": n, "side": "llama-server" if m in SERVER_MODES else "ours", "mode": m,
                         "tokens_per_second": round(tps, 1), "ratio": round(tps / plain_tps, 3) if plain_tps else None,
                         "identical": same, "accepted": accepted, "drafted": drafted,
                         "tps_runs": [round(r["tps"], 1) for r in rs]})
    if args.json:
        print(json.dumps({"model": model, "llama_server": binary, "rounds": args.rounds, "rows": rows}, indent=2))
        return 0
    print(f"\n{'prompt':<6} {'side':<13} {'mode':<13} {'tok/s':>7} {'ratio':>6} {'identical':>9} {'accepted/drafted':>17}")
    for r in rows:
        acc = f"{r['accepted']}/{r['drafted']}" if r["drafted"] else "-"
        print(f"{r['prompt']:<6} {r['side']:<13} {r['mode']:<13} {r['tokens_per_second']:>7.1f} "
              f"{r['ratio']:>6.2f} {'yes' if r['identical'] else 'NO':>9} {acc:>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
