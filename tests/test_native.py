"""The native Llama path computes what transformers computes, and its tokenizer matches AutoTokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from vicuna_cli.core import models
from vicuna_cli.core.errors import VicunaError
from vicuna_cli.core.native_llama import unsupported_reason
from vicuna_cli.core.templates import EXAMPLE_CONVERSATION

TEXTS = [
    "Hello there, how are you?",
    "  leading spaces and\nnew lines\n\n",
    "안녕하세요 반갑습니다. 你好世界。 🙂🎉 café 𝄞",
    "USER: Hi ASSISTANT: Paris</s>USER: more",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.mark.parametrize("pair", [("sp_loaded", "sp_native"), ("bpe_loaded", "bpe_native")])
def test_logits_match_transformers(pair, request):
    reference, native = (request.getfixturevalue(name) for name in pair)
    assert native.implementation == "native" and reference.implementation == "transformers"
    ids = torch.tensor([reference.tokenizer("The capital of France is Paris. 안녕")["input_ids"]])
    with torch.inference_mode():
        expected = reference.model(input_ids=ids).logits
        got = native.model(input_ids=ids, past_key_values=None, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_cached_decoding_and_chunked_prefill_match_a_full_forward(sp_native):
    model = sp_native.model
    ids = torch.tensor([sp_native.tokenizer("Hello there, how are you? I am fine.")["input_ids"]])
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits
        cache = model.new_cache(4)  # small on purpose: the buffers must grow
        first = model(input_ids=ids[:, :5], past_key_values=cache).logits
        chunk = model(input_ids=ids[:, 5:9], past_key_values=cache).logits  # a chunk after a prefix
        steps = [model(input_ids=ids[:, i : i + 1], past_key_values=cache).logits for i in range(9, ids.shape[1])]
    stitched = torch.cat([first, chunk, *steps], dim=1)
    assert torch.allclose(stitched, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pair", [("sp_loaded", "sp_native"), ("bpe_loaded", "bpe_native")])
def test_tokenizer_matches_autotokenizer(pair, request):
    reference, native = (request.getfixturevalue(name).tokenizer for name in pair)
    for text in TEXTS:
        for special in (True, False):
            assert native(text, add_special_tokens=special)["input_ids"] == reference(text, add_special_tokens=special)["input_ids"]
        ids = reference(text)["input_ids"]
        for skip in (True, False):
            assert native.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert (native.bos_token_id, native.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert native.chat_template == reference.chat_template


def test_chat_template_render_matches(bpe_loaded, bpe_native):
    messages = [{"role": "system", "content": "Be brief."}, *EXAMPLE_CONVERSATION]
    for generation_prompt in (True, False):
        assert bpe_native.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == \
            bpe_loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_unsupported_checkpoints_are_named():
    base = {"model_type": "llama"}
    assert unsupported_reason(base) is None
    assert "mistral" in unsupported_reason({"model_type": "mistral"})
    assert "llama3" in unsupported_reason({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert "biases" in unsupported_reason({**base, "attention_bias": True})


def test_auto_picks_transformers_when_native_cannot(sp_model_dir, tmp_path):
    import shutil

    copy = shutil.copytree(sp_model_dir, tmp_path / "m")
    config = json.loads((copy / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (copy / "config.json").write_text(json.dumps(config))
    assert models.pick_implementation(copy, "cpu") == ("transformers", "rope scaling 'linear'")
    assert models.pick_implementation(sp_model_dir, "cpu")[0] == "native"
    assert models.pick_implementation(sp_model_dir, "cuda")[0] == "transformers"
    with pytest.raises(VicunaError, match="native implementation cannot load"):
        models.pick_implementation(copy, "cpu", "native")
    with pytest.raises(VicunaError, match="unknown implementation"):
        models.pick_implementation(copy, "cpu", "fast")


@pytest.mark.slow
def test_embedded_model_native_matches_transformers(embedded_model_home, monkeypatch):
    """The real SmolLM2 checkpoint: same greedy tokens, same chat template render."""
    from vicuna_cli.core.generate import Engine, SamplingParams
    from vicuna_cli.core.templates import ChatTemplate

    monkeypatch.setenv("VICUNA_HOME", str(embedded_model_home))
    outputs, renders = [], []
    for implementation in ("native", "transformers"):
        lm = models.load(None, dtype="float32", implementation=implementation)
        rendered = ChatTemplate(lm.tokenizer).render([{"role": "user", "content": "Name three colours."}]).text
        engine = Engine(lm.model, lm.tokenizer, lm.context_length)
        generation = engine.generate(engine.encode(rendered, add_special_tokens=False), SamplingParams(temperature=0, max_new_tokens=24))
        list(generation)
        outputs.append(generation.output_ids)
        renders.append(rendered)
    assert renders[0] == renders[1]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("slots", [[0, 2, 3], [1, 2, 3], [3, 1]])
def test_batched_decode_rows_match_one_sequence_at_a_time(sp_native, slots):
    """Rows at different positions, in consecutive (a view of the cache) or scattered slots,
    give the logits each sequence gets alone (the slot cache is what continuous batching uses)."""
    model, tok = sp_native.model, sp_native.tokenizer
    texts = ["Hello there, how are you?", "The capital of France is Paris.", "USER: hi", "안녕하세요 반갑습니다."]
    prompts = [tok(t)["input_ids"] for t in texts][: len(slots)]
    next_tokens = [[7, 9, 11], [12, 5, 8], [30, 31, 32], [40, 41, 42]][: len(slots)]
    with torch.inference_mode():
        cache = model.new_cache(4, num_slots=4, max_capacity=256)  # small: the buffers must grow
        for slot, ids in zip(slots, prompts):
            model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1, slot=slot)
        batched = [model.decode_rows([t[i] for t in next_tokens], cache, slots) for i in range(3)]
        for row, (ids, extra) in enumerate(zip(prompts, next_tokens)):
            alone = model(input_ids=torch.tensor([ids + extra]), use_cache=False).logits[0, -3:]
            got = torch.stack([b[row] for b in batched])
            assert torch.allclose(got, alone, atol=1e-5, rtol=1e-4)
    assert [cache.lengths[s] for s in slots] == [len(p) + 3 for p in prompts]


def test_decode_rows_at_the_same_position(sp_native):
    model, tok = sp_native.model, sp_native.tokenizer
    ids = tok("Hello there, how are you?")["input_ids"]
    with torch.inference_mode():
        cache = model.new_cache(64, num_slots=2)
        for slot in (0, 1):
            model(input_ids=torch.tensor([ids]), past_key_values=cache, slot=slot)
        logits = model.decode_rows([5, 6], cache, [0, 1])
        alone = [model(input_ids=torch.tensor([ids + [t]]), use_cache=False).logits[0, -1] for t in (5, 6)]
    assert torch.allclose(logits, torch.stack(alone), atol=1e-5, rtol=1e-4)


def test_ragged_prefill_of_several_sequences_matches_each_alone(sp_native):
    """prefill_segments: chunks of several sequences in one forward, from a fresh slot, after a
    cached prefix, and a single token, give each sequence's own logits and fill its slot."""
    model, tok = sp_native.model, sp_native.tokenizer
    texts = ["Hello there, how are you today?", "The capital of France is Paris.", "USER: hi", "안녕하세요 반갑습니다."]
    seqs = [tok(t)["input_ids"] for t in texts]
    split = {0: 0, 1: 4, 2: len(seqs[2]) - 1, 3: 2}  # tokens already in the slot before the ragged step
    with torch.inference_mode():
        cache = model.new_cache(4, num_slots=4, max_capacity=256)
        for slot, ids in enumerate(seqs):
            if split[slot]:
                model(input_ids=torch.tensor([ids[: split[slot]]]), past_key_values=cache, logits_to_keep=1, slot=slot)
        order = [2, 0, 3, 1]  # slots in any order
        logits = model.prefill_segments([(s, seqs[s][split[s] :]) for s in order], cache)
        for row, slot in enumerate(order):
            alone = model(input_ids=torch.tensor([seqs[slot]]), use_cache=False).logits[0, -1]
            assert torch.allclose(logits[row], alone, atol=1e-5, rtol=1e-4), slot
        assert cache.lengths == [len(s) for s in seqs]
        # The slots hold the right keys: one more decode step per slot matches the full forward.
        step = model.decode_rows([5, 6, 7, 8], cache, [0, 1, 2, 3])
        for slot, t in enumerate([5, 6, 7, 8]):
            alone = model(input_ids=torch.tensor([seqs[slot] + [t]]), use_cache=False).logits[0, -1]
            assert torch.allclose(step[slot], alone, atol=1e-5, rtol=1e-4), slot


def test_fp32_cpu_decoder_weights_are_column_major_and_the_rest_row_major(sp_native, sp_model_dir):
    """The layout load_native picks (see native_llama._weight); the values are the checkpoint's."""
    from safetensors.torch import load_file

    from vicuna_cli.core.native_llama import Linear, fuse_projections, load_native

    saved = {k: v for shard in sp_model_dir.glob("*.safetensors") for k, v in load_file(shard).items()}
    model = sp_native.model
    assert "model.layers.0.self_attn.q_proj.weight" in saved and "model.layers.0.mlp.up_proj.weight" in saved
    # q/k/v and gate/up are stacked into one projection each; every other tensor is the checkpoint's.
    saved = fuse_projections(saved, model.shape.num_layers)
    assert not any(k.endswith((".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight"))
                   for k in saved)
    for name, param in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        column_major = name.startswith("model.layers.") and isinstance(module, Linear)
        expected = (1, param.shape[0]) if column_major else ((param.shape[1], 1) if param.dim() == 2 else (1,))
        assert param.stride() == expected, (name, param.stride())
        assert torch.equal(param, saved[name].float()), name
    bf16 = load_native(sp_model_dir, torch.bfloat16, "cpu")
    assert all(p.is_contiguous() for p in bf16.parameters())


def test_bf16_prepacked_weights_compute_exactly_what_plain_weights_do(sp_model_dir, monkeypatch):
    """bf16 on CPU runs oneDNN-prepacked weights (native_llama.pack_weights, for speed): the logits
    of a prefill, a cached decode step and a batched decode are bitwise those of F.linear."""
    from vicuna_cli.core import native_llama

    packed = native_llama.load_native(sp_model_dir, torch.bfloat16, "cpu")
    if not torch.backends.mkldnn.is_available():
        pytest.fail("this torch has no oneDNN: the packed path is not exercised")
    assert packed.lm_head.packed is not None and packed.model.layers[0].self_attn.qkv_proj.weight.numel() == 0
    monkeypatch.setattr(native_llama, "pack_weights", lambda model: False)
    plain = native_llama.load_native(sp_model_dir, torch.bfloat16, "cpu")
    assert plain.lm_head.packed is None
    (prefill, (step,)), (plain_prefill, (plain_step,)) = (_prefill_then_decode(m, [8, 5], 1) for m in (packed, plain))
    assert torch.equal(prefill, plain_prefill) and torch.equal(step, plain_step)


PROMPT_IDS = [1, 17, 23, 5, 9, 31, 2, 44]


def _prefill_then_decode(model, lengths: list[int], steps: int):
    """Prefill one slot per length (prefixes of PROMPT_IDS), then `steps` batched greedy decode
    steps over all slots: (the first slot's prefill logits, each step's logits)."""
    with torch.inference_mode():
        cache = model.new_cache(32, num_slots=len(lengths))
        prefill = None
        for slot, n in enumerate(lengths):
            logits = model(input_ids=torch.tensor([PROMPT_IDS[:n]]), past_key_values=cache, slot=slot).logits
            prefill = logits if prefill is None else prefill
        tokens, out = [7 + k for k in range(len(lengths))], []
        for _ in range(steps):
            logits = model.decode_rows(tokens, cache, list(range(len(lengths))))
            out.append(logits)
            tokens = logits.argmax(-1).tolist()
    return prefill, out


def test_fp32_weights_are_packed_for_batched_steps_and_compute_what_plain_weights_do(sp_model_dir):
    """fp32 on CPU with batch_rows > 1 (a serve worker, PPO rollouts): the projections run on
    oneDNN-packed copies (pack_weights; 2-3.7x faster for batched steps), with batch_rows 1 (chat)
    the column-major layout. Their logits agree to fp32 summation-order differences, and greedy
    continuations of a batch are the same."""
    from vicuna_cli.core.native_llama import load_native

    if not torch.backends.mkldnn.is_available():
        pytest.fail("this torch has no oneDNN: the packed path is not exercised")
    single = load_native(sp_model_dir, torch.float32, "cpu")
    batched = load_native(sp_model_dir, torch.float32, "cpu", batch_rows=16)
    assert single.lm_head.packed is None and single.model.layers[0].self_attn.qkv_proj.weight.stride()[0] == 1
    assert batched.lm_head.packed is not None and batched.model.layers[0].mlp.down_proj.weight.numel() == 0
    (prefill, steps), (single_prefill, single_steps) = (_prefill_then_decode(m, [8, 5, 3], 6) for m in (batched, single))
    torch.testing.assert_close(prefill, single_prefill, atol=2e-4, rtol=1e-4)
    for a, b in zip(steps, single_steps):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
