"""Packing, step plans and loss normalisation: packed == unpacked, and the micro-batch split or
gradient accumulation never changes the step's loss or update."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch

from vicuna_cli.core.templates import get_template
from vicuna_cli.train.config import TrainConfig
from vicuna_cli.train.dataset import Conversation
from vicuna_cli.train.labels import IGNORE, LabelBuilder
from vicuna_cli.train.packing import best_fit_decreasing, collate, plan_epoch, split_step, supervised_tokens

WORDS = "hello there how are you I am fine thank you the capital of France is Paris".split()


def conversations(n: int, seed: int = 0) -> list[Conversation]:
    import random

    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))

    return [Conversation(f"c{i}", [{"role": "system", "content": "Be brief."}] + [
        m for _ in range(rng.randint(1, 3))
        for m in ({"role": "user", "content": text(6)}, {"role": "assistant", "content": text(10)})])
        for i in range(n)]


@pytest.fixture(scope="module")
def model64(sp_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sp_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sp_model_dir, dtype=torch.float64, attn_implementation="sdpa")
    samples = LabelBuilder(tokenizer, get_template("vicuna_v1.1"), 256).build_many(conversations(12), Counter())
    return model, samples


def test_best_fit_decreasing_packs_every_item_once_within_capacity():
    lengths = [9, 2, 7, 4, 4, 1, 6, 3, 10, 5]
    bins = best_fit_decreasing(range(len(lengths)), lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 6  # 51 tokens: 6 bins is optimal here (a 10, and 9+1, 7+3, 6+4, 5+4+... )
    assert bins[0] == [8]  # longest first
    assert [lengths[i] for i in bins[1]] == [9, 1]  # best fit: the 1 goes where it fills a bin


def test_epoch_plans_are_seeded_and_cover_the_data():
    lengths = list(range(1, 41))
    a = plan_epoch(lengths, 0, seed=3, batch_size=8)
    assert a == plan_epoch(lengths, 0, seed=3, batch_size=8)
    assert a != plan_epoch(lengths, 1, seed=3, batch_size=8)
    assert sorted(i for step in a for i in step) == list(range(40)) and [len(s) for s in a] == [8] * 5
    by_tokens = plan_epoch(lengths, 0, seed=3, batch_tokens=100)
    assert sorted(i for step in by_tokens for i in step) == list(range(40))
    assert all(sum(lengths[i] for i in step) <= 100 for step in by_tokens)


@pytest.mark.parametrize("packing", [True, False])
def test_ranks_share_a_step_with_equal_micro_batch_counts(packing):
    lengths = [30, 5, 12, 19, 7, 25, 3]
    step = list(range(7))
    parts = [split_step(step, lengths, 3, rank, packing, 32, 2) for rank in range(3)]
    assert len({len(p) for p in parts}) == 1
    assert sorted(i for p in parts for group in p for i in group) == step


def test_packed_rows_reset_positions_and_ignore_each_samples_first_label(model64):
    _, samples = model64
    batch = collate(samples[:3], packing=True, pad_id=0)
    starts = [0, len(samples[0]), len(samples[0]) + len(samples[1])]
    assert batch["input_ids"].shape == (1, sum(len(s) for s in samples[:3]))
    assert "attention_mask" not in batch
    assert [int(batch["position_ids"][0, s]) for s in starts] == [0, 0, 0]
    # targets are shifted: the token before each sample start predicts nothing
    assert [int(batch["targets"][0, s - 1]) for s in starts[1:]] == [IGNORE, IGNORE]
    assert int((batch["targets"] != IGNORE).sum()) == supervised_tokens(samples[:3])


@pytest.mark.parametrize("fused", [True, False])
def test_packed_loss_equals_unpacked_loss(model64, fused):
    from vicuna_cli.train.modeling import sft_loss

    model, samples = model64
    loss = sft_loss(fused)
    with torch.no_grad():
        one_by_one = sum(loss(model, collate([s], True, 0)) for s in samples)
        packed = loss(model, collate(samples, True, 0))
        padded = loss(model, collate(samples, False, 0))
    assert packed.dtype == torch.float64
    assert torch.allclose(packed, one_by_one, rtol=1e-10, atol=0)
    assert torch.allclose(padded, one_by_one, rtol=1e-10, atol=0)
    # and a packed row without reset positions would differ: the test can fail
    wrong = collate(samples, True, 0)
    wrong["position_ids"] = torch.arange(wrong["input_ids"].shape[1])[None]
    with torch.no_grad():
        assert not torch.allclose(loss(model, wrong), one_by_one, rtol=1e-6)


def test_fused_and_plain_losses_agree(model64):
    from vicuna_cli.train.modeling import sft_loss

    model, samples = model64
    batch = collate(samples, True, 0)
    with torch.no_grad():
        assert torch.allclose(sft_loss(True)(model, batch), sft_loss(False)(model, batch), rtol=1e-10)


def _one_step(model, samples, packing, capacity, micro_batch_size):
    from accelerate import Accelerator

    from vicuna_cli.train.checkpoint import TrainerState
    from vicuna_cli.train.loop import LoopSpec, _step
    from vicuna_cli.train.modeling import LossModule, sft_loss

    module = LossModule(copy.deepcopy(model), sft_loss(True))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = TrainConfig(packing=packing, max_length=capacity, micro_batch_size=micro_batch_size, max_grad_norm=0)
    assert config.row_capacity == capacity
    spec = LoopSpec(samples=samples, eval_samples=[], lengths=[len(s) for s in samples], config=config,
                    collate=lambda b: collate(b, packing, 0))
    loss, _, _, n, _ = _step(Accelerator(cpu=True), module, optimizer, scheduler, spec, list(range(len(samples))), 1, 0,
                          list(module.parameters()), TrainerState())
    return loss, n, [p.detach().clone() for p in module.parameters()]


def test_loss_and_update_do_not_depend_on_the_micro_batch_split(model64):
    model, samples = model64
    longest = max(len(s) for s in samples)
    reference = _one_step(model, samples, True, sum(len(s) for s in samples), 1)  # one packed row
    for packing, capacity, micro in [(True, longest, 1), (False, 256, 1), (False, 256, 5)]:
        loss, n, params = _one_step(model, samples, packing, capacity, micro)
        assert n == reference[1]
        assert loss == pytest.approx(reference[0], rel=1e-10)
        assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(params, reference[2]))


def test_one_autocast_region_per_update_casts_each_weight_once_with_the_same_update(model64, monkeypatch):
    """bf16 autocast over several micro-batches: loop.cast_once_per_update keeps each weight's bf16
    cast for the whole update. The update is bitwise the one of casting in every micro-batch, and
    the fp32 -> bf16 weight casts drop to one per weight (counted)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.profiler import profile

    from vicuna_cli.train import loop
    from vicuna_cli.train.checkpoint import TrainerState
    from vicuna_cli.train.modeling import LossModule, sft_loss
    from vicuna_cli.train.sft import _forget_other_precision

    model, samples = model64
    config = TrainConfig(packing=True, max_length=max(len(s) for s in samples), max_grad_norm=0)

    def one_step(cast_once: bool):
        _forget_other_precision("bf16")
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        module = accelerator.prepare(LossModule(copy.deepcopy(model).float(), sft_loss(False)))
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        spec = loop.LoopSpec(samples=samples, eval_samples=[], lengths=[len(s) for s in samples], config=config,
                             collate=lambda b: collate(b, True, 0))
        if not cast_once:
            monkeypatch.setattr(loop, "cast_once_per_update", lambda *a: (contextlib.nullcontext(), contextlib.nullcontext))
        with profile() as trace:
            loop._step(accelerator, module, optimizer, scheduler, spec, list(range(len(samples))), 1, 0,
                       list(module.parameters()), TrainerState())
        monkeypatch.undo()
        casts = sum(e.count for e in trace.key_averages() if e.key == "aten::_to_copy")
        return casts, [p.detach().clone() for p in module.parameters()]

    try:
        once, per_micro_batch = one_step(True), one_step(False)
    finally:
        AcceleratorState._reset_state()  # the other tests here build fp32/fp64 accelerators
    rows = len(loop.split_step(list(range(len(samples))), [len(s) for s in samples], 1, 0, True,
                               config.row_capacity, 1))
    assert rows >= 3  # several micro-batches, or there is nothing to share
    assert all(torch.equal(a, b) for a, b in zip(once[1], per_micro_batch[1]))
    weights = sum(1 for name, _ in model.named_parameters() if "proj" in name)  # the matmul weights autocast casts
    assert per_micro_batch[0] - once[0] >= (rows - 1) * weights, (once[0], per_micro_batch[0])


def test_max_steps_wins_over_epochs():
    from vicuna_cli.train.loop import LoopSpec

    def spec(**options):
        return LoopSpec(samples=[], eval_samples=[], collate=None, lengths=[5] * 10,
                        config=TrainConfig(global_batch_size=4, **options))

    assert spec(epochs=1, max_steps=7).total_steps() == 7
    assert [len(plan) for plan in spec(epochs=1, max_steps=7).plans()] == [3, 3, 3]  # three epochs of 3 steps cover 7
    assert spec(epochs=2).total_steps() == 6
