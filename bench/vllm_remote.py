"""Our remote backend against vLLM itself, in one run: vLLM (CPU) serving the embedded
SmolLM2's real weights, started here, then ``bench/remote_overhead.py`` against it
(a chat through our daemon's ``backend: remote`` alias vs the same request straight
to vLLM; TTFT and tokens/s, medians of alternating rounds).

It makes what it needs with the project's own scripts: the scale environment
(``scripts/scale-setup``, about 3.5 GB the first time) and the model folder
(``scripts/convert_for_vllm.py``, cached). It prints how long vLLM took to
answer, then remote_overhead's table. vLLM runs as it comes (with its warm-up
compilation) unless ``--eager``.

    .venv/bin/python bench/vllm_remote.py [--rounds 5] [--tokens 200] [--eager]

Goal (issue 16): throughput >= 0.97x of direct, under 20 ms added to the first token.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the helpers the tests start vLLM with

from remote_servers import (ScaleUnavailable, VllmServer, converted_model, free_port, reporter,  # noqa: E402
                            scale_python)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--eager", action="store_true", help="start vLLM with --enforce-eager (no warm-up compilation)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    args = ap.parse_args()

    t0 = time.monotonic()
    try:
        python = scale_python(say=reporter())
        setup_s = time.monotonic() - t0
        model = converted_model(python)
    except ScaleUnavailable as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    convert_s = time.monotonic() - t0 - setup_s
    log = Path(tempfile.mkdtemp(prefix="vllm-bench-")) / "vllm.log"
    server = VllmServer(python, model, free_port(), log, *(["--enforce-eager"] if args.eager else []))
    try:
        server.ready(timeout=args.startup_timeout, say=reporter())
        print(f"scale environment ready in {setup_s:.1f} s, model folder in {convert_s:.1f} s")
        print(f"vLLM {'(eager) ' if args.eager else ''}answered {server.startup_s:.1f} s after it was started "
              f"(log: {log})")
        sys.stdout.flush()
        return subprocess.call([sys.executable, str(ROOT / "bench" / "remote_overhead.py"), "--url", server.url,
                                "--served-model", server.served, "--rounds", str(args.rounds),
                                "--tokens", str(args.tokens)])
    except ScaleUnavailable as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
