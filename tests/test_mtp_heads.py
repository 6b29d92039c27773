"""A model with several NextN layers (one trained head per future token, as
MiMo-V2 and Step-3.5 ship them) drafts with every head: step i with head i
(llama.cpp's ``chain_heads``), on a tiny random ``mimo2`` GGUF the test
writes (one decoder layer, two NextN layers). Random heads guess badly: what
matters is that each head runs, and that the output is plain decoding's."""

from __future__ import annotations

import numpy as np
import pytest

from gguf_writer import gpt2_vocab, random_weights, write_gguf

from assistant.inference import speculative as S
from assistant.inference.generation import generate
from assistant.inference.sampling import SamplingParams
from backends.base import LoadOptions

pytest.importorskip("llama_cpp")
import llama_cpp.llama_cpp as C  # noqa: E402

if not hasattr(C, "LLAMA_CONTEXT_TYPE_MTP"):
    pytest.skip("this llama-cpp-python has no MTP context API", allow_module_level=True)

from backends.llamacpp import LlamaCppBackend  # noqa: E402

PROMPTS = ([5, 70, 80, 90, 100, 33, 44, 55], list(range(40, 140, 3)), list(range(200, 120, -2)))


def tiny_mimo2_gguf(path, *, n_heads: int = 2, seed: int = 0, kind: str = "Q8_0"):
    """A random tiny MiMo-V2-style model (llama.cpp arch ``mimo2``): one dense
    decoder layer (sliding window) and ``n_heads`` NextN layers after it, each
    a dense block with a fused QKV and its ``nextn.eh_proj/enorm/hnorm``; the
    LM head and its norm fall back to the model's. Head size 32 (a Q8_0 K cache)."""
    rng = np.random.default_rng(seed)
    E, FF, n_head, n_kv, hd, L = 64, 128, 2, 1, 32, 1
    vocab_meta, V = gpt2_vocab()
    w, norm = random_weights(rng)
    t = {"token_embd.weight": (w(V, E, scale=1.0), kind), "output_norm.weight": (norm(E), "F32"),
         "output.weight": (w(V, E), kind)}
    for i in range(L + n_heads):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": (norm(E), "F32"),
                  b + "attn_qkv.weight": (w((n_head + 2 * n_kv) * hd, E), kind),
                  b + "attn_output.weight": (w(E, n_head * hd), kind), b + "ffn_norm.weight": (norm(E), "F32"),
                  b + "ffn_gate.weight": (w(FF, E), kind), b + "ffn_up.weight": (w(FF, E), kind),
                  b + "ffn_down.weight": (w(E, FF), kind)})
        if i >= L:
            t.update({b + "nextn.eh_proj.weight": (w(E, 2 * E), kind), b + "nextn.enorm.weight": (norm(E), "F32"),
                      b + "nextn.hnorm.weight": (norm(E), "F32")})
    a = "mimo2"
    meta = {"general.architecture": a, "general.name": "tiny-mimo2-mtp", "general.file_type": 7,
            f"{a}.context_length": 512, f"{a}.embedding_length": E, f"{a}.block_count": L + n_heads,
            f"{a}.feed_forward_length": FF, f"{a}.attention.head_count": n_head,
            f"{a}.attention.head_count_kv": n_kv, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{a}.rope.freq_base": 10000.0, f"{a}.attention.key_length": hd, f"{a}.attention.value_length": hd,
            f"{a}.rope.dimension_count": hd, f"{a}.expert_feed_forward_length": FF,
            f"{a}.attention.sliding_window": 128,
            f"{a}.attention.sliding_window_pattern": [True] + [False] * n_heads,  # llama.cpp wants one SWA layer
            f"{a}.nextn_predict_layers": n_heads}
    meta.update(vocab_meta)
    return write_gguf(path, meta, t)


def _load(path, **extra):
    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=512, n_threads=2, extra={"kv_type": "q8_0/f16", **extra}))
    return b


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    path = tiny_mimo2_gguf(tmp_path_factory.mktemp("mimo2") / "tiny-mimo2.gguf")
    chained, first_only = _load(path), _load(path, mtp_heads=1)
    yield chained, first_only
    chained.unload()
    first_only.unload()


def _draft(b, prompt, n):
    b.truncate(0)
    tok = int(np.argmax(b.forward(prompt)[-1]))
    return b.mtp_draft(prompt + [tok], n)


def test_each_head_drafts_its_own_step(mimo):
    chained, first_only = mimo
    assert chained.info.choices["mtp"] == "draft context over 2 NextN layer(s), one head per draft step (mimo2)"
    assert first_only.info.choices["mtp"] == ("draft context over 2 NextN layer(s), the first one for every "
                                              "draft step (mimo2)")
    assert chained.mtp_kind() == "nextn"
    differ = 0
    for prompt in PROMPTS:
        two = _draft(chained, prompt, 5)
        assert len(two) == 2  # one token per head: two heads, two tokens
        one = _draft(first_only, prompt, 5)
        assert len(one) == 5
        assert two[0] == one[0]  # step 0 is head 0 either way
        differ += two[1] != one[1]  # step 1: head 1, not head 0 again
        mem = C.llama_get_memory(chained._mtp.ctx)
        assert C.llama_memory_seq_pos_max(mem, 0) == len(prompt) - 1  # the draft rows are gone
    assert differ >= 2, "the second head never changed the second guess"


def test_chained_drafts_follow_the_text_after_a_cut(mimo):
    """Every head's KV is rebuilt for what the target evaluated again: the same
    text drafts the same after the cache was cut back and evaluated anew."""
    chained, _ = mimo
    prompt = PROMPTS[1]
    first = _draft(chained, prompt, 2)
    chained.truncate(0)
    tok = int(np.argmax(chained.forward(prompt)[-1]))
    assert chained.mtp_draft(prompt + [tok], 2) == first
    chained.truncate(12)
    chained.forward(prompt[12:])
    assert chained.mtp_draft(prompt + [tok], 2) == first


def test_greedy_and_seeded_output_is_plain_decodings(mimo):
    chained, _ = mimo
    for prompt in PROMPTS[:2]:
        chained.truncate(0)
        plain = generate(chained, prompt, SamplingParams(temperature=0), max_tokens=48)
        chained.truncate(0)
        engine = S.SpeculativeEngine(S.MtpDrafter(chained), adaptive=False, max_draft=4)
        spec = generate(chained, prompt, SamplingParams(temperature=0), max_tokens=48, speculative=engine)
        assert spec.tokens == plain.tokens and spec.stats.drafted > 0
    params = SamplingParams(temperature=0.9, top_k=20, seed=5)
    chained.truncate(0)
    plain = generate(chained, PROMPTS[2], params, max_tokens=40)
    chained.truncate(0)
    engine = S.SpeculativeEngine(S.MtpDrafter(chained), adaptive=False, max_draft=4)
    assert generate(chained, PROMPTS[2], params, max_tokens=40, speculative=engine).tokens == plain.tokens
