"""The memory plan (backends/memory_plan.py) on GGUF headers with the real
Gemma 4 12B shapes, written as sparse files (tests/gemma4_shapes.py: the
header in full, the data a hole): its weights against the published file
sizes, its KV cache and compute buffers against llama.cpp's own accounting
(a ``no_alloc`` load reports the buffers it would allocate, allocating none),
the context it picks on a 16 GB machine, and ``assistant doctor``'s section."""

from __future__ import annotations

import json
import logging
import re

import pytest

from backends.base import MachineFigures, ModelLoadError
from backends.gguf import read_header
from backends.memory_plan import (PlanOptions, attention_layers, build_plan, find_projector, kv_cache_line,
                                  largest_context, needed_bytes, os_headroom)
from backends.sizing import pick_context_planned
from gemma4_shapes import (GEMMA4_12B, Gemma4Shape, allocated_bytes, assistant_tensors, target_tensors,
                           write_gemma4_12b, write_gemma4_12b_assistant, write_gemma4_12b_mmproj, write_sparse_gguf)

GiB, MiB = 1 << 30, 1 << 20
META_MAX = 20_000_000  # a Gemma 4 file's metadata (262,144 tokens, scores, merges, template) is ~15.8 MB

# Published sizes of Gemma 4 12B GGUF files, in bytes (see the README's memory plan for sources).
GOOGLE_QAT_Q4_0 = 6_975_877_728  # google/gemma-4-12B-it-qat-q4_0-gguf, gemma-4-12b-it-qat-q4_0.gguf
UNSLOTH_Q4_K_M = 7_121_861_440  # unsloth/gemma-4-12b-it-GGUF, gemma-4-12b-it-Q4_K_M.gguf
GGML_Q4_K_M_GIB = 6.87  # ggml-org/gemma-4-12B-it-GGUF, gemma-4-12B-it-Q4_K_M.gguf ("~6.87 GiB")
DRAFTER_Q8_0 = 465_109_248  # gemma-4-12B-it-assistant as GGUF, Q8_0
DRAFTER_BF16 = 861_520_128  # and BF16
MMPROJ = 175_115_264  # mmproj-gemma-4-12b-it-qat-q4_0.gguf


@pytest.fixture(scope="module")
def g12(tmp_path_factory):
    """The 12B target (Q4_K_M), its drafter and projector beside it: ~7.8 GB of
    files that take ~10 MB of disk."""
    d = tmp_path_factory.mktemp("g12")
    target = write_gemma4_12b(d / "gemma-4-12b-it-Q4_K_M.gguf")
    drafter = write_gemma4_12b_assistant(d / "mtp-gemma-4-12b-it-Q8_0.gguf", vocab=True)
    mmproj = write_gemma4_12b_mmproj(d / "mmproj-gemma-4-12b-it-F16.gguf")
    return target, drafter, mmproj


def machine(total=16 * GiB, available=None):
    return MachineFigures(physical_cores=4, logical_cores=8, ram_total_bytes=total, ram_available_bytes=available)


# -- weights: the header's tensors against the published files ---------------------------


def test_the_12b_files_are_sparse_and_whole(g12):
    target, drafter, mmproj = g12
    assert target.stat().st_size > 7e9 and allocated_bytes(target) < 20e6
    assert allocated_bytes(drafter) < 20e6 and allocated_bytes(mmproj) < 1e6
    h = read_header(target)
    assert h.arch == "gemma4" and h.vocab_size == 262144 and len(h.tensors) == 3 + 48 * 12 + 40
    assert h.file_size >= h.tensor_bytes  # the data section is all there (as a hole)


def test_weights_match_the_published_12b_files(g12, tmp_path):
    q4km = read_header(g12[0])
    weights = build_plan(q4km, machine(), 4096).line("weights").bytes
    assert weights == q4km.tensor_bytes == 7_365_558_272
    # ggml-org's Q4_K_M (llama.cpp's own mix): "~6.87 GiB" for the whole file
    assert abs((weights + 15.8e6) / GiB - GGML_Q4_K_M_GIB) < 0.01
    # Unsloth's Q4_K_M is the same mix with a Q4_K token embedding: equal to within its metadata
    q4k_embd = weights - 3840 * 262144 * (210 - 144) // 256
    assert 0 < UNSLOTH_Q4_K_M - q4k_embd < META_MAX
    # Google's QAT Q4_0 (Q4_0 layers, a Q6_K embedding): exactly, but for the metadata
    q40 = read_header(write_sparse_gguf(tmp_path / "q4_0.gguf", {"general.architecture": "gemma4"},
                                        target_tensors(GEMMA4_12B, "Q4_0")))
    assert 0 < GOOGLE_QAT_Q4_0 - q40.tensor_bytes < META_MAX
    # The drafter, Q8_0 and BF16: its metadata is the same ~15.8 MB vocabulary
    for kind, published in (("Q8_0", DRAFTER_Q8_0), ("BF16", DRAFTER_BF16)):
        d = read_header(write_sparse_gguf(tmp_path / f"mtp-{kind}.gguf", {"general.architecture": "gemma4-assistant"},
                                          assistant_tensors(kind=kind)))
        assert 0 < published - d.tensor_bytes < META_MAX, kind
    assert 0 < MMPROJ - read_header(g12[2]).tensor_bytes < 1_000_000


# -- the KV cache: sliding-window and shared-KV layers as they are ------------------------


def test_gemma4_12b_kv_cache_per_layer_kind(g12):
    h = read_header(g12[0])
    layers, window = attention_layers(h)
    assert window == 1024 and sum(ly.swa for ly in layers) == 40
    full = [ly for ly in layers if not ly.swa]
    assert {(ly.k_width, ly.v_width) for ly in full} == {(512, 512)}  # 1 KV head of 512
    assert {(ly.k_width, ly.v_width) for ly in layers if ly.swa} == {(2048, 2048)}  # 8 of 256
    n = 32768
    f16_full = kv_cache_line(h, n, PlanOptions()).bytes
    assert f16_full == n * (8 * 512 * 4 + 40 * 2048 * 4)  # every sliding layer holds n cells
    window_sized = kv_cache_line(h, n, PlanOptions(swa_full=False)).bytes
    assert window_sized == n * 8 * 512 * 4 + 1536 * 40 * 2048 * 4  # pad256(1024 + 512) cells
    q8 = kv_cache_line(h, n, PlanOptions(type_k="q8_0")).bytes
    assert q8 == n * (8 * (544 + 1024) + 40 * (2176 + 4096))  # Q8_0 K: 34 bytes per 32 values


def test_shared_kv_layers_and_drafters_hold_no_cache(tmp_path):
    s = Gemma4Shape(hidden=256, layers=6, ffn=512, heads=2, kv_heads_swa=2, kv_heads_full=1, head_dim_swa=64,
                    head_dim_full=128, window=128, period=3, vocab=1000, context=4096, shared_kv_layers=2)
    from gemma4_shapes import _meta

    h = read_header(write_sparse_gguf(tmp_path / "shared.gguf", _meta("gemma4", s, "Q8_0", False),
                                      target_tensors(s, "Q8_0")))
    layers, _ = attention_layers(h)
    assert [ly.has_kv for ly in layers] == [True] * 4 + [False] * 2
    line = kv_cache_line(h, 1024, PlanOptions())
    # layers 0, 1, 3 slide (2 KV heads of 64), 2 is full (1 of 128); 4 and 5 reuse earlier layers' KV
    assert line.bytes == 1024 * (3 * 2 * 128 * 2 + 1 * 2 * 128 * 2)
    assert "2 layers reuse" in line.detail
    drafter = read_header(write_gemma4_12b_assistant(tmp_path / "mtp.gguf"))
    assert kv_cache_line(drafter, 65536, PlanOptions()).bytes == 0


def test_without_flash_attention_v_rows_are_padded_to_the_widest(g12):
    h = read_header(g12[0])
    on = kv_cache_line(h, 8192, PlanOptions())
    off = kv_cache_line(h, 8192, PlanOptions(flash_attn=False))
    assert off.bytes - on.bytes == 8192 * 8 * (2048 - 512) * 2  # the full layers' V rows widened


def test_architectures_without_a_pattern(tmp_path):
    def header(arch, **keys):
        meta = {"general.architecture": arch, f"{arch}.block_count": 12, f"{arch}.embedding_length": 256,
                f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2, **keys}
        path = write_sparse_gguf(tmp_path / f"{arch}.gguf", meta, [("token_embd.weight", [256, 100], "F16")])
        return read_header(path)

    g3 = header("gemma3", **{"gemma3.attention.sliding_window": 512})
    layers, window = attention_layers(g3)  # llama.cpp's fixed period: 5 sliding, 1 full
    assert window == 512 and [ly.swa for ly in layers] == [True] * 5 + [False] + [True] * 5 + [False]
    llama = header("llama")
    assert attention_layers(llama) == ([attention_layers(llama)[0][0]] * 12, 0)
    assert kv_cache_line(llama, 1000, PlanOptions()).bytes == 1024 * 12 * 2 * 64 * 2 * 2  # rounded up to 1024 cells
    assert kv_cache_line(header("odd"), 512, PlanOptions()) is not None  # no head info: still a layout
    hostile = header("evil", **{"evil.block_count": 1 << 40, "evil.attention.key_length": "wide"})
    assert attention_layers(hostile) is None and build_plan(hostile, machine(), 512).fits
    negative = header("neg", **{"neg.attention.key_length": -5})
    assert attention_layers(negative) is None
    bare = read_header(write_sparse_gguf(tmp_path / "bare.gguf", {"general.architecture": "x"}, []))
    assert kv_cache_line(bare, 512, PlanOptions()) is None
    assert build_plan(bare, machine(), 512).line("kv cache @512").bytes == 0


# -- llama.cpp's own accounting ---------------------------------------------------------------


class _LlamaLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _llama_sizes(C, model, n_ctx, *, nb=512, type_k=1, fa=True, swa_full=True, log):
    """KV and compute (with the output buffer) llama.cpp reports for a context, in bytes."""
    p = C.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, nb, nb, 1
    p.type_k, p.flash_attn_type, p.swa_full = type_k, int(fa), swa_full
    log.lines.clear()
    ctx = C.llama_init_from_model(model, p)
    assert ctx, "\n".join(log.lines[-5:])
    C.llama_free(ctx)
    text = "\n".join(log.lines)
    kv = sum(float(x) for x in re.findall(r"kv_cache: size =\s+([\d.]+) MiB", text))
    compute = sum(float(x) for x in re.findall(r"(?:compute|output) buffer size =\s+([\d.]+) MiB", text))
    return kv * MiB, compute * MiB


@pytest.fixture
def llama_log():
    """llama.cpp's log lines (the backend's logger at DEBUG) while a test runs."""
    log = _LlamaLog()
    logger = logging.getLogger("backends.llamacpp")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(log)
    yield log
    logger.removeHandler(log)
    logger.setLevel(old)


def _check_against_llama_cpp(path, configs, log):
    llamacpp_native = pytest.importorskip("backends.llamacpp_native")
    C = llamacpp_native.llama()
    mp = C.llama_model_default_params()
    mp.no_alloc, mp.use_extra_bufts, mp.load_mode = True, False, 0  # simulate: allocate nothing, map nothing
    model = C.llama_model_load_from_file(str(path).encode(), mp)
    assert model, "\n".join(log.lines[-5:])
    h = read_header(path)
    try:
        assert C.llama_model_size(model) == h.tensor_bytes
        for n_ctx, nb, kind, fa, swa_full in configs:
            kv, compute = _llama_sizes(C, model, n_ctx, nb=nb, type_k={"f16": 1, "q8_0": 8}[kind], fa=fa,
                                       swa_full=swa_full, log=log)
            plan = build_plan(h, machine(), n_ctx, PlanOptions(type_k=kind, flash_attn=fa, swa_full=swa_full,
                                                               n_ubatch=nb))
            what = f"{path.name}: n_ctx {n_ctx}, batch {nb}, K {kind}, flash {fa}, swa_full {swa_full}"
            assert abs(plan.line(f"kv cache @{n_ctx}").bytes - kv) < 0.01 * MiB, what  # llama.cpp prints 2 decimals
            mine = plan.line("compute").bytes
            assert compute * 0.97 - 2 * MiB <= mine <= compute * 1.10 + 2 * MiB, (what, mine / MiB, compute / MiB)
    finally:
        C.llama_model_free(model)


def test_kv_and_compute_agree_with_llama_cpp(g12, llama_log):
    """The 12B's KV cache to the byte (as printed), and its compute buffers within -3%..+10%
    (the attention mask is counted in full: llama.cpp's allocator often fits it in room
    the logits leave), in every layout the backend may ask for (a 1000-token context:
    llama.cpp rounds it to 1024 cells)."""
    _check_against_llama_cpp(g12[0], [(8192, 512, "f16", True, True), (8192, 512, "q8_0", True, True),
                                      (32768, 512, "q8_0", True, False), (1000, 64, "f16", True, True),
                                      (16384, 512, "f16", False, True), (4096, 1, "q8_0", True, False)], llama_log)


def test_a_model_without_sliding_layers_agrees_with_llama_cpp(llama_log):
    from assistant.config.models import resolve_model

    _check_against_llama_cpp(resolve_model("smollm2-135m").path,
                             [(2048, 512, "f16", True, True), (8192, 512, "q8_0", True, True),
                              (4096, 32, "f16", False, True)], llama_log)


# -- the context it picks ------------------------------------------------------------------


def test_the_16gb_plan(g12):
    h, d = read_header(g12[0]), read_header(g12[1])
    m = machine()
    assert os_headroom(16 * GiB) == 4 * GiB
    plain = largest_context(h, m, PlanOptions(), ceiling=262144)
    drafted = largest_context(h, m, PlanOptions(type_k="q8_0", drafter=d), ceiling=262144)
    window = largest_context(h, m, PlanOptions(type_k="q8_0", drafter=d, swa_full=False), ceiling=262144)
    for plan, opts in ((plain, PlanOptions()), (drafted, drafted.options), (window, window.options)):
        assert plan.fits and plan.needed <= 12 * GiB
        bigger = build_plan(h, m, plan.context + 256, opts)
        assert plan.context == 262144 or not bigger.fits  # the largest that fits, to 256 tokens
    assert 12000 <= plain.context <= 16384  # a full-size sliding-window cache: ~344 KB a token
    assert drafted.context > plain.context  # Q8_0 K saves more than the drafter takes
    assert window.context > 200_000  # window-sized: the 40 sliding layers hold 1536 cells
    names = [ln.name for ln in drafted.lines]
    assert names == ["weights", "drafter", f"kv cache @{drafted.context}", "compute", "os headroom"]
    # the drafter's context as the backend makes it (8-row batches, not the target's 512): ~540 MiB
    # of compute less, ~2300 more tokens (16,896 against 14,592 here)
    small = largest_context(h, m, PlanOptions(type_k="q8_0", drafter=d, drafter_n_ubatch=8), ceiling=262144)
    assert small.fits and small.context >= drafted.context + 2048


def test_pick_context_planned(g12):
    h = read_header(g12[0])
    o = PlanOptions()
    ctx, why, plan = pick_context_planned(machine(), h, train_ctx=262144, requested=None, options=o)
    assert ctx == plan.context and "largest context whose memory plan fits" in why and "262144" in why
    ctx, why, plan = pick_context_planned(machine(), h, train_ctx=262144, requested=65536, options=o)
    assert ctx == 65536 and why.startswith("65536: set in config") and "does not fit" in why and not plan.fits
    ctx, why, _ = pick_context_planned(machine(64 * GiB), h, train_ctx=8192, requested=None, options=o)
    assert ctx == 8192 and "training context" in why
    ctx, why, _ = pick_context_planned(machine(8 * GiB), h, train_ctx=262144, requested=None, options=o)
    assert ctx == 512 and "does not fit" in why  # 7 GB of weights in 8 GB: the minimum, said so
    ctx, why, _ = pick_context_planned(machine(None), h, train_ctx=262144, requested=None, options=o)
    assert ctx == 4096 and "RAM size unknown" in why
    # RAM available now below the total less the headroom: the load may take only that
    ctx, _, plan = pick_context_planned(machine(64 * GiB, 9 * GiB), h, train_ctx=262144, requested=None, options=o)
    assert plan.limit == 9 * GiB and plan.fits and plan.needed <= 9 * GiB


def test_pick_context_for_load_on_a_real_file():
    from assistant.config.models import resolve_model
    from backends.sizing import pick_context_for_load

    path = resolve_model("smollm2-135m").path
    h = read_header(path)
    ctx, why = pick_context_for_load(machine(64 * GiB), path, train_ctx=8192, requested=None, extra={})
    assert ctx == 8192 and "training context" in why
    at_1024 = build_plan(h, None, 1024, PlanOptions.for_load({"kv_type": "q8_0/f16"})).needed
    ctx, why = pick_context_for_load(machine(64 * GiB, at_1024), path, train_ctx=8192, requested=None,
                                     extra={"kv_type": "q8_0/f16", "memory_plan": True})
    assert ctx == 1024 and "largest context" in why


def test_for_load_follows_the_backend_options(g12):
    o = PlanOptions.for_load({"kv_type": "q8_0/f16", "swa_full": False, "flash_attn": False}, n_batch=256,
                             mtp_model=str(g12[1]), mmproj=str(g12[2]))
    assert (o.type_k, o.type_v, o.swa_full, o.flash_attn, o.n_ubatch) == ("q8_0", "f16", False, False, 256)
    assert o.drafter.arch == "gemma4-assistant" and o.projector.arch == "clip"
    # the drafter's context decodes one row a step: its batch is the backend's (8), not the target's;
    # llama.cpp (no_alloc, 8192 cells, Q8_0 K) reserves 9.15 MiB for it at 8 rows, 522.5 MiB at 512
    from backends.llamacpp_mtp_assistant import DRAFT_N_BATCH

    assert o.drafter_n_ubatch == DRAFT_N_BATCH == 8
    detail = build_plan(read_header(g12[0]), None, 8192, o).line("compute").detail
    assert "the drafter's context 9 MiB of it" in detail, detail
    assert PlanOptions.for_load({}) == PlanOptions()
    with pytest.raises(ModelLoadError):
        PlanOptions.for_load({}, mtp_model=str(g12[0].parent / "missing.gguf"))
    assert find_projector(g12[0]) == g12[2]
    full = needed_bytes(g12[0], 4096, {}, mtp_model=str(g12[1]))
    h = read_header(g12[0])
    assert full == build_plan(h, None, 4096, PlanOptions.for_load({}, mtp_model=str(g12[1]), mmproj=str(g12[2]))).needed
    assert needed_bytes(g12[0].parent / "missing.gguf", 4096, {}) is None


def test_a_projector_for_another_model_is_not_counted(tmp_path):
    target = write_gemma4_12b_assistant(tmp_path / "model.gguf")  # 1024 wide: a projector into 3840 is not its own
    write_gemma4_12b_mmproj(tmp_path / "mmproj-x.gguf")
    (tmp_path / "mmproj-junk.gguf").write_bytes(b"not a gguf")
    assert find_projector(target) is None
    assert find_projector(tmp_path / "missing.gguf") is None
    mine = write_gemma4_12b_mmproj(tmp_path / "mmproj-y.gguf")
    big = write_gemma4_12b(tmp_path / "big.gguf", vocab=False)
    assert find_projector(big) == tmp_path / "mmproj-x.gguf" != mine  # the first in name order


# -- doctor ----------------------------------------------------------------------------------


def test_doctor_prints_the_plan_line_by_line(g12, isolated_home):
    from conftest import run_cli

    cfg = isolated_home / "config.yaml"
    cfg.write_text(f"model: g12\nbackend: llama.cpp\nmodels:\n  g12:\n    path: {g12[0]}\n")
    report = json.loads(run_cli("doctor", "--json", config=cfg).stdout)
    model = report["model"]
    memory = model["memory"]
    names = [ln["name"] for ln in memory["plan"]["lines"]]
    assert names[0] == "weights" and f"kv cache @{model['context']}" in names
    assert {"projector", "compute", "os headroom"} <= set(names)
    assert memory["projector"] == str(g12[2]) and memory["plan"]["context"] == model["context"]
    assert memory["plan"]["lines"][0]["bytes"] == 7_365_558_272
    text = run_cli("doctor", config=cfg).stdout
    block = text[text.index("memory:   plan at"):text.index("context:  ")]
    for name in ("weights", "kv cache @", "projector", "compute", "os headroom", "total"):
        assert re.search(rf"^\s+{re.escape(name)}", block, re.M), (name, block)
    assert "K q8_0 / V f16" in block  # the default drafter (auto) drafts: Q8_0 K, as the daemon loads it


def test_doctor_plans_f16_k_when_the_model_does_not_draft(g12, isolated_home):
    from assistant.cli.doctor_memory import memory_section
    from assistant.config import load_config
    from assistant.config.models import resolve_model
    from assistant.machine import hardware

    cfg = isolated_home / "config.yaml"
    cfg.write_text(f"model: g12\nmodels:\n  g12:\n    path: {g12[0]}\nspeculative:\n  drafter: off\n")
    config = load_config(cfg)
    memory = memory_section(config, "g12", resolve_model("g12", config), hardware.probe(), "llama.cpp", 4096, 262144)
    assert "K f16 / V f16" in memory["settings"] and memory["drafter"] is None
    assert memory["context"] == 4096 and memory["plan"]["context"] == 4096


def test_doctor_counts_a_paired_drafter(tmp_path, isolated_home):
    gemma4_files = pytest.importorskip("gemma4_files")
    from conftest import run_cli

    target = gemma4_files.write_target(tmp_path / "tiny-gemma4.gguf")
    drafter = gemma4_files.write_assistant(tmp_path / "mtp-tiny-gemma4.gguf")
    cfg = isolated_home / "config.yaml"
    cfg.write_text(f"model: tiny\nbackend: llama.cpp\nmodels:\n  tiny:\n    path: {target}\n")
    memory = json.loads(run_cli("doctor", "--json", config=cfg).stdout)["model"]["memory"]
    lines = {ln["name"]: ln for ln in memory["plan"]["lines"]}
    assert memory["drafter"] == str(drafter) and lines["drafter"]["bytes"] == read_header(drafter).tensor_bytes
    assert "drafter's context" in lines["compute"]["detail"]
    assert memory["context"] == 2048  # its training context: everything fits
