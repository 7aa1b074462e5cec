"""FLOPs: the papers' figures reproduced, and the analytical count checked against a FLOP counter."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

import tokenprune as tp
from tokenprune import cost
from tokenprune.pruner import PrunerNeeds
from tokenprune.zoo import tiny

LLAVA_7B_TEXT = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32064)


def test_fastv_table1_per_layer():
    per_layer = cost.llm_flops(LLAVA_7B_TEXT, [612] * 32, convention="paper") / 32
    assert per_layer / 1e9 == pytest.approx(99.3, abs=0.05)


def test_fastv_k2_r50_is_55_percent():
    # 612 tokens, 576 of them visual; FastV K=2 drops half the image tokens from layer 2 on.
    base = cost.llm_flops(LLAVA_7B_TEXT, [612] * 32, convention="paper")
    pruned = cost.llm_flops(LLAVA_7B_TEXT, [612] * 2 + [612 - 288] * 30, convention="paper")
    assert round(pruned / base, 2) == 0.55


def test_full_convention_counts_gqa_and_gated_mlp():
    mha = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=10)
    gqa = LlamaConfig(**{**mha.to_dict(), "num_key_value_heads": 1})
    n = 10
    # by hand: q,o 2*n*64*64, k,v 2*n*64*(kv*16), attention 2*4*16*n*n, mlp 3*n*64*128, head 64*10
    def by_hand(kv):
        return 2 * (2 * n * 64 * 64 + 2 * n * 64 * kv * 16 + 2 * 4 * 16 * n * n + 3 * n * 64 * 128 + 64 * 10)
    assert cost.llm_flops(mha, [n], new_tokens=1) == by_hand(4)
    assert cost.llm_flops(gqa, [n], new_tokens=1) == by_hand(1)


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("name", [None, "fopru_rank", "fastv"])
def test_analytical_flops_within_5_percent_of_flop_counter(family, name):
    model, processor = getattr(tiny, f"tiny_{family}")(attn_implementation="eager") if family == "llava" else \
        getattr(tiny, f"tiny_{family}")()
    model.config._attn_implementation = "eager"  # FlopCounterMode misses some SDPA paths on CPU
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")  # and MoE experts' grouped_mm
    for block in getattr(getattr(model, "vision_tower", None), "blocks", ()):  # timm ViTs: its unfused path too
        if hasattr(getattr(block, "attn", None), "fused_attn"):
            block.attn.fused_attn = False
    lvlm = tp.wrap(model, processor)
    lvlm.runner.model.config._attn_implementation = "eager"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    pruner = None if name is None else tp.create_pruner(name, ratio=0.5)
    batch = {k: v for k, v in lvlm.prepare([image], ["what is in the image ?"]).items()}
    vision = counted_flops(lambda: lvlm.encode_images(batch, PrunerNeeds()))
    views = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2))
    llm_inputs = lvlm._assemble(batch, views, pruner if pruner is None or pruner.stage.value == "pre_llm" else None,
                                "keep", ["0"])[0]
    in_llm = pruner if pruner is not None and pruner.stage.value == "in_llm" else None
    llm = counted_flops(lambda: lvlm.runner.generate(llm_inputs, 4, pruner=in_llm, ignore_eos=True))
    out = lvlm.generate([image], ["what is in the image ?"], pruner=pruner, max_new_tokens=4, ignore_eos=True)
    c = cost.sample_cost(model.config, lvlm.vision_spec(), out.stats[0])
    assert c.prefill + c.decode + c.lm_head == pytest.approx(llm, rel=0.05)
    assert c.vision == pytest.approx(vision, rel=0.05)
