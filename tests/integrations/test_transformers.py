"""attn_implementation="s2attn" against transformers' own eager attention under the expanded sparse mask."""

import copy
import warnings

import pytest
import torch

import s2attn

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, DynamicCache, StaticCache  # noqa: E402
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

from s2attn.integrations import transformers as hf  # noqa: E402
from s2attn.models import hhst_config  # noqa: E402

SETTINGS = {"block_size": 16, "local_blocks": 2, "vert_stride": 4, "dense_layers": [1]}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def eager_check(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention with the layer's pattern expanded to an additive token mask."""
    sq, sk = query.shape[2], key.shape[2]
    pattern = hf.layer_pattern(module.config, module.layer_idx, sk)
    if pattern is None:
        allowed = torch.ones(1, sq, sk, dtype=torch.bool).tril(sk - sq)
    else:
        allowed = pattern.to_token_mask(sq, sk)
    allowed = allowed.to(query.device)
    additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    additive = additive.masked_fill(~allowed, float("-inf"))[None]
    return eager_attention_forward(module, query, key, value, additive, scaling=scaling, dropout=dropout)


hf.register()
AttentionInterface.register("s2attn_eager_check", eager_check)


def tiny(family="llama", layers=3, settings=SETTINGS, seed=0):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, attention_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, **extra)
    config.s2attn = copy.deepcopy(settings)
    config._attn_implementation = "s2attn"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def twin(model, implementation):
    other = copy.deepcopy(model)
    other.config._attn_implementation = implementation
    return other


def tokens(batch, length, seed=1):
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_matches_eager_under_expanded_mask(family):
    model = tiny(family).train()
    ref = twin(model, "s2attn_eager_check").train()
    x = tokens(2, 201)
    out, out_ref = model(x, labels=x), ref(x, labels=x)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        err = (p.grad - p_ref.grad).norm() / p_ref.grad.norm()
        assert err < 1e-4, f"{family} grad {name}: relative error {err:.2e}"
    # the pattern really is sparse at this length and it changes the result
    assert hf.layer_pattern(model.config, 0, 201).density(201) < 0.6
    with warnings.catch_warnings():  # a dense twin on purpose: no "config carries s2attn settings" warning here
        warnings.simplefilter("ignore", UserWarning)
        dense_logits = twin(model, "sdpa")(x).logits
    assert (dense_logits - out.logits).abs().max() > 1e-2


@pytest.fixture
def reference_path(monkeypatch):
    """Generation launches one kernel a token: under the CPU interpreter that costs minutes. These
    tests check the integration's generation logic; kernel = reference is pinned in tests/kernels."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(s2attn.ops, "use_kernel", lambda q: False)


@pytest.mark.usefixtures("reference_path")
def test_generate_matches_eager_under_expanded_mask():
    model = tiny()
    ref = twin(model, "s2attn_eager_check")
    prompt = tokens(2, 150)
    kw = dict(max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True)
    out, out_ref = model.generate(prompt, **kw), ref.generate(prompt, **kw)
    assert torch.equal(out.sequences, out_ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(out_ref.scores), rtol=1e-4, atol=1e-4)


def test_config_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="s2attn").eval()
    assert loaded.config._attn_implementation == "s2attn"
    assert hf.s2attn_settings(loaded.config) == hf.s2attn_settings(model.config)
    x = tokens(1, 99)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def real_logits_alone(model, rows):
    return [model(torch.tensor([r])).logits[0] for r in rows]


@pytest.mark.usefixtures("reference_path")
def test_left_padding_forward_and_generate():
    model = tiny()
    rows = [tokens(1, 120, seed=3)[0].tolist(), tokens(1, 77, seed=4)[0].tolist()]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for i, alone in enumerate(real_logits_alone(model, rows)):
        torch.testing.assert_close(logits[i, -len(rows[i]):], alone, rtol=1e-4, atol=1e-4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    for i, r in enumerate(rows):
        alone = model.generate(torch.tensor([r]), max_new_tokens=20, do_sample=False)
        assert out[i, width:].tolist() == alone[0, len(r):].tolist()


def test_right_padding_forward():
    model = tiny()
    rows = [tokens(1, 64, seed=5)[0].tolist(), tokens(1, 101, seed=6)[0].tolist()]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    logits = model(ids, attention_mask=mask).logits
    for i, alone in enumerate(real_logits_alone(model, rows)):
        torch.testing.assert_close(logits[i, : len(rows[i])], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_sequences(how):
    model = tiny()
    rows = [tokens(1, n, seed=n)[0].tolist() for n in (40, 95, 33)]
    ids = torch.tensor([sum(rows, [])])
    position_ids = torch.cat([torch.arange(len(r)) for r in rows])[None]
    kwargs = {"position_ids": position_ids}
    if how == "cu_seq_lens":  # boundaries from the collator alone: RoPE is relative, so plain positions do too
        cu = torch.tensor([0, 40, 135, 168], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=95, max_length_k=95)
    logits = model(ids, **kwargs).logits[0]
    for r, alone, start in zip(rows, real_logits_alone(model, rows), (0, 40, 135)):
        torch.testing.assert_close(logits[start : start + len(r)], alone, rtol=1e-4, atol=1e-4)


def test_unsupported_inputs_are_refused():
    model = tiny()
    x = tokens(1, 40)
    hole = torch.ones(1, 40, dtype=torch.long)
    hole[0, 10] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=hole)
    with pytest.raises(ValueError, match="past_key_values"):
        model(x, past_key_values=StaticCache(config=model.config, max_cache_len=64), use_cache=True)
    with pytest.raises(ValueError, match=r"cu_seq_lens_q=\[0, 10, 40\], cu_seq_lens_k=\[0, 20, 40\]: expected equal"):
        model(x, cu_seq_lens_q=torch.tensor([0, 10, 40], dtype=torch.int32),
              cu_seq_lens_k=torch.tensor([0, 20, 40], dtype=torch.int32), max_length_q=30, max_length_k=30)
    with pytest.raises(ValueError, match="dropout"):
        bad = tiny()
        bad.config.attention_dropout = 0.1
        for layer in bad.model.layers:
            layer.self_attn.attention_dropout = 0.1
        bad.train()(x)
    with pytest.raises(ValueError, match="sliding_window"):
        settings = dict(FAMILIES["mistral"][2], sliding_window=16)
        FAMILIES["mistral_sw"] = ("MistralConfig", "MistralForCausalLM", settings)
        try:
            tiny("mistral_sw")(x)
        finally:
            del FAMILIES["mistral_sw"]
    with pytest.raises(ValueError, match="unknown keys"):
        tiny(settings={"block": 16})(x)
    with pytest.raises(ValueError, match="dense_layers"):
        tiny(settings={"dense_layers": [7]})(x)


def test_dynamic_cache_prefill_in_chunks_matches_one_pass():
    model = tiny()
    x = tokens(1, 130)
    cache = DynamicCache(config=model.config)
    first = model(x[:, :70], past_key_values=cache, use_cache=True).logits
    second = model(x[:, 70:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), model(x).logits, rtol=1e-4, atol=1e-4)


def test_hhst_config_copies_and_sets_implementation():
    base = tiny().config
    base._attn_implementation = "sdpa"
    cfg = hhst_config(base, dense_layers=[0, 2], local=3, stride=8, block_size=32, homogeneous=True)
    assert base._attn_implementation == "sdpa" and cfg._attn_implementation == "s2attn"
    assert cfg.s2attn["dense_layers"] == [0, 2] and cfg.s2attn["homogeneous"] is True
    assert hf.layer_pattern(cfg, 0, 100) is None
    rule = hf.layer_pattern(cfg, 1, 100).rule
    assert (rule.local_blocks, rule.vert_stride, rule.homogeneous) == (3, 8, True)
    assert hf.layer_pattern(cfg, 1, 100) is hf.layer_pattern(cfg, 1, 120)  # cached per length bucket
    with pytest.raises(ValueError, match="dense_layers"):
        hhst_config(base, dense_layers=[3])
    hf.register()  # idempotent
    assert AttentionInterface._global_mapping["s2attn"] is hf.s2attn_attention_forward


@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_sparse_paged_cache_matches_and_keeps_fewer_blocks(padded):
    from s2attn.integrations.transformers import S2Cache

    device = "cuda" if torch.cuda.is_available() else "cpu"  # paged decode is a Triton kernel (interpreted on CPU)
    model = tiny().to(device)
    lengths = (150, 97) if padded else (150, 150)
    rows = [tokens(1, n, seed=7 + i)[0].tolist() for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)  # left padding
    mask = (torch.arange(width)[None] >= torch.tensor([width - n for n in lengths])[:, None]).long().to(device)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    # unpadded: transformers' eager attention under the expanded mask; padded: the default DynamicCache
    # (whose padding handling is checked against unpadded runs above)
    ref = (model if padded else twin(model, "s2attn_eager_check")).generate(ids, **kw)
    cache = S2Cache.for_model(model, max_batch_size=2, max_seq_len=256)
    out = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)
    # sparse layers (0 and 2) hold fewer pages than the dense layer 1, which keeps every block
    pages = [cache.kv.pages_in_use(i) for i in range(3)]
    assert pages[0] == pages[2] < pages[1] == 2 * sum(-(-(n + 4) // 16) for n in lengths)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.kv.bytes_in_use() == 0
    with pytest.raises(ValueError, match="_attn_implementation"):
        S2Cache.for_model(twin(model, "sdpa"), max_batch_size=1)


# ---------------------------------------------------------------------------------------------- no silent fallbacks
def test_sliding_windows_and_softcapping_are_refused_when_built():
    mistral = transformers.MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128)  # sliding_window=4096
    with pytest.raises(ValueError, match=r"config\.sliding_window=4096: attn_implementation='s2attn' has no sliding "
                                         r"window .* set config\.sliding_window=None"):
        hhst_config(mistral)
    capped = tiny().config
    capped.attn_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"config\.attn_logit_softcapping=30\.0: .* does not soft-cap"):
        hhst_config(capped)
    with pytest.raises(ValueError, match=r"config\.attn_logit_softcapping=30\.0"):
        hf.S2Cache(capped, max_batch_size=1)
    qwen = tiny("qwen2").config  # sliding_window kept in the config but used by no layer: fine
    qwen.sliding_window, qwen.layer_types = 64, ["full_attention"] * 3
    hhst_config(qwen)


def test_model_loaded_without_s2attn_warns_once(tmp_path, monkeypatch):
    s2attn.validation.forget_warnings()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tiny().save_pretrained(tmp_path)
    x = tokens(1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        type(tiny()).from_pretrained(tmp_path, attn_implementation="s2attn")(x)  # the fix: silent
    dense = type(tiny()).from_pretrained(tmp_path).eval()
    assert dense.config._attn_implementation == "sdpa"
    with pytest.warns(UserWarning, match=r"LlamaAttention: config\.s2attn holds s2attn settings, but the model runs "
                                         r"attn_implementation='sdpa' .* load it with attn_implementation='s2attn'"):
        dense(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dense(x)  # once
        hf.register()  # idempotent: sdpa is wrapped once
        checked = AttentionInterface._global_mapping["sdpa"]
        assert checked._s2attn_checks_config and not hasattr(checked.__wrapped__, "_s2attn_checks_config")


def test_s2cache_on_the_cpu_takes_the_reference(monkeypatch):
    """Without a GPU or the interpreter, generation with S2Cache runs (decode on the reference, as
    sparse_attention does) and matches the default cache."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny()
    prompt = tokens(2, 70)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(prompt, **kw)
    out = model.generate(prompt, past_key_values=hf.S2Cache.for_model(model, max_batch_size=2, max_seq_len=128), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)


def test_s2cache_length_limits_are_refused_before_anything_changes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny()
    for bad in (0, True, 100.0):
        with pytest.raises(ValueError, match=rf"max_seq_len={bad!r}: expected a positive int"):
            hf.S2Cache.for_model(model, max_batch_size=1, max_seq_len=bad)
    with pytest.raises(ValueError, match=r"num_pages=10: layer 0 gets 10 pages, but 2 sequences of max_seq_len=128 "
                                         r"tokens can need \d+"):
        hf.S2Cache.for_model(model, max_batch_size=2, max_seq_len=128, num_pages=10)
    cache = hf.S2Cache.for_model(model, max_batch_size=1, max_seq_len=100)
    with pytest.raises(ValueError, match=r"100 \+ 1 tokens exceed the cache's max_seq_len=100"):
        model.generate(tokens(1, 90), past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert cache.get_seq_length() == cache.kv.seq_len(cache.slots[0]) == 100  # the refused step wrote nothing


def test_s2cache_forward_that_fails_between_layers_is_undone(monkeypatch):
    """A forward that raises between two layers leaves nothing behind: the next forward sees the cache as
    if the failed one never ran (same logits as a cache that never saw it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny()
    prompt, junk, nxt = tokens(1, 50), tokens(1, 20, seed=5), tokens(1, 1, seed=6)

    def run(fail: bool):
        cache = hf.S2Cache.for_model(model, max_batch_size=1, max_seq_len=128)
        model(prompt, past_key_values=cache, use_cache=True)
        if fail:
            hook = model.model.layers[1].mlp.register_forward_pre_hook(lambda *_: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                model(junk, past_key_values=cache, use_cache=True)
            hook.remove()
        return model(nxt, past_key_values=cache, use_cache=True).logits, cache

    ref, ref_cache = run(False)
    out, cache = run(True)
    torch.testing.assert_close(out, ref)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 51
    assert [cache.kv.pages_in_use(i) for i in range(3)] == [ref_cache.kv.pages_in_use(i) for i in range(3)]
