"""The rollout's decoding: a preallocated KV cache equal to the dynamic one, LoRA merged with bit-identical weights
after, and a clean fallback for caches it cannot hold."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import prompt_batch, sample
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from dip_r1 import decoding, reuse
from dip_r1.models import LoraSpec, load_policy


@pytest.fixture(scope="module")
def tiny_qwen3_vl(tmp_path_factory) -> str:
    from dip_r1.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "qwen3_vl", "qwen3_vl", "xs"))


def _lora_policy(path):
    """A LoRA policy whose adapters are not zero (peft starts lora_B at 0, which would merge into nothing)."""
    model, processor = load_policy(path, lora=LoraSpec(r=4, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval(), processor


def _rollout(model, inputs, seed=0, **kw):
    torch.manual_seed(seed)
    return sample(model, inputs, group_size=3, max_new_tokens=10, **kw)


def test_preallocated_cache_equals_dynamic_in_every_family(
    tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_qwen3_vl, monkeypatch
):
    updates = []
    dynamic_update = DynamicLayer.update
    monkeypatch.setattr(
        DynamicLayer, "update", lambda self, *a, **k: updates.append(1) or dynamic_update(self, *a, **k)
    )
    for path in (tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_qwen3_vl):
        model, processor = _lora_policy(path)
        inputs = prompt_batch(processor)
        layers = model.config.get_text_config().num_hidden_layers
        for sampled in (False, True):
            updates.clear()
            ours = _rollout(model, inputs, do_sample=sampled, merge_lora=False)
            assert len(updates) == layers  # the prefill only: no token grows the cache by concatenation
            ref = _rollout(model, inputs, do_sample=sampled, merge_lora=False, preallocate=False)
            assert len(updates) == 2 * layers + 9 * layers  # both prefills, then one update a token
            assert torch.equal(ours.completion_ids, ref.completion_ids), path


def test_weights_after_a_merged_rollout_are_bit_identical(tiny_qwen2_5_vl):
    model, processor = _lora_policy(tiny_qwen2_5_vl)
    inputs = prompt_batch(processor)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    modules = dict(model.named_modules())
    swapped = []
    forward = type(model.get_base_model()).forward

    def spy(self, *a, **k):  # during the rollout the adapted layers are plain nn.Linear with merged weights
        if not swapped:
            swapped.append(sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in self.modules()))
        return forward(self, *a, **k)

    type(model.get_base_model()).forward = spy
    try:
        merged = _rollout(model, inputs, do_sample=False)
    finally:
        type(model.get_base_model()).forward = forward
    assert swapped == [sum("visual" in n for n, m in model.named_modules() if hasattr(m, "lora_A"))]
    unmerged = _rollout(model, inputs, do_sample=False, merge_lora=False)
    assert torch.equal(merged.completion_ids, unmerged.completion_ids)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, copy) in before.items():
        assert after[name] is param, name  # the very tensors of before
        assert torch.equal(param, copy), name  # and their bits
    assert dict(model.named_modules()).keys() == modules.keys()
    with model.disable_adapter(), decoding.merged_lora(model, tokens=10**6) as merged_layers:
        assert merged_layers == 0  # the base model: nothing to merge


def test_no_merge_for_bases_that_are_not_plain_linear():
    class Quantised(torch.nn.Linear):  # stands for bitsandbytes' Linear4bit / Linear8bitLt
        pass

    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("plain", torch.nn.Linear(8, 8))
    model.add_module("quantised", Quantised(8, 8))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["plain", "quantised"]))
    layers = {name: layer for _, name, layer in decoding._lora_layers(model)}
    assert decoding._merge_blocker(layers["plain"]) is None
    assert "nn.Linear" in decoding._merge_blocker(layers["quantised"])


def test_caches_it_cannot_hold_fall_back_to_the_dynamic_cache(tiny_qwen2_vl, monkeypatch):
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    cache, reason = decoding.preallocated_cache(sliding, 2, 16)
    assert cache is None and "DynamicSlidingWindowLayer" in reason
    from transformers import Qwen3_5TextConfig

    hybrid = DynamicCache(config=Qwen3_5TextConfig(num_hidden_layers=4))  # Gated DeltaNet states, 3 to 1
    cache, reason = decoding.preallocated_cache(hybrid, 2, 16)
    assert cache is None and "LinearAttentionLayer" in reason

    model, processor = load_policy(tiny_qwen2_vl)
    model.eval()
    inputs = prompt_batch(processor)
    monkeypatch.setattr("dip_r1.rollout.preallocated_cache", lambda *a: (None, "a linear-attention state"))
    monkeypatch.setattr(reuse, "_FALLBACKS", set())  # warned once per process: forget earlier tests' warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _rollout(model, inputs)
        again = _rollout(model, inputs)
    assert [str(w.message) for w in caught if "KV cache" in str(w.message)] == [
        "rollouts keep the dynamic KV cache: a linear-attention state (falling back to the exact, slower path)"
    ]  # once, not at every rollout
    assert torch.equal(first.completion_ids, again.completion_ids)


def test_compiled_decode_step_equals_eager(tiny_qwen2_vl, monkeypatch):
    # dynamo's tracing with the eager backend: the compiled path captures the decoding forward and gives the
    # same tokens; inductor's code generation (what a GPU run uses) is too slow for a CPU test
    import functools

    from dip_r1 import rollout

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(rollout, "_COMPILED", rollout.weakref.WeakKeyDictionary())
    model, processor = load_policy(tiny_qwen2_vl)
    model.eval()
    inputs = prompt_batch(processor)
    eager = _rollout(model, inputs, do_sample=False)
    compiled = _rollout(model, inputs, do_sample=False, compile_decode=True)
    assert torch.equal(eager.completion_ids, compiled.completion_ids)
    assert len(rollout._COMPILED) == 1


def test_disable_dropout_zeroes_every_dropout(tiny_qwen2_vl):
    from dip_r1.models import PolicySpec
    from dip_r1.module import GRPOModule

    module = GRPOModule(PolicySpec(tiny_qwen2_vl, lora=LoraSpec(r=4, dropout=0.1)), disable_dropout=True)
    module.configure_model()
    dropouts = [m for m in module.policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
