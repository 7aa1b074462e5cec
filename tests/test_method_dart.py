"""DART's pivot order: the official loop visits its pivots in ``list(set(positions))`` order.

Official code: ``ZichenWen1/DART`` ``llava/model/language_model/modeling_llama_self.py``,
``DART.get_retained_image_token`` (read at the fork ``xqy1111111/DART@d6a5af6``, the file last changed by
Zichen Wen at 9fee9fa, 2025-03-19; the same loop is in LightCompress ``token_reduction/dart.py``). The
pivots are absolute sequence positions (``image_token_start_index + i``; text after the image), put in a
Python ``set`` and iterated: CPython's hash-table order, not sequence order. Tests: that order worked out
by hand, kept sets worked out by hand where it differs from sequence order, the pruner against a literal
transcription of the official function on random batched inputs, and the positions the decoder hands
the pruner on every family.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
from tokenprune.benchmarks.dart_order import official_get_retained_image_token  # the transcription, one copy
from tokenprune.methods.dart import official_walk
from tokenprune.pruner import LLMStage, PrunerNeeds, PruningInputs, Reduction, Stage, TokenPruner

from test_adapters import FAMILIES, PROMPTS, images, lvlm_for


def sequence_walk_reference(hidden_normed, keys, text_keys, text_hidden_normed, per_pivot, pivots=4):
    """Today's rule (``pivot_order="sequence"``): the official loop with its pivots visited in sorted order."""
    n = keys.shape[1]
    img = torch.norm(keys[0], p=1, dim=-1).topk(pivots).indices.tolist()
    txt = (torch.norm(text_keys[0], p=1, dim=-1).topk(pivots).indices + n).tolist()
    states = torch.cat([hidden_normed[0], text_hidden_normed[0]])
    kept, valid = set(img), set(range(n)) - set(img)
    for item in sorted(img) + sorted(txt):
        pool = sorted(valid)
        cos_sim = -F.cosine_similarity(states[item, :], states[pool, :], dim=-1)
        top = [pool[i] for i in cos_sim.topk(per_pivot).indices]
        kept.update(top)
        valid.difference_update(top)
    return sorted(kept)


# -- the set's order, by hand ---------------------------------------------------------------------------
def test_official_walk_is_cpythons_set_order_worked_by_hand():
    # An 8-slot table (mask 7). 67 lands in slot 67 & 7 = 3; 35 wants slot 3 too: the table is too small for
    # linear probing (3 + 9 > 7), so it perturbs: perturb = 35 >> 5 = 1, slot (3 * 5 + 1 + 1) & 7 = 1; 36 in 4.
    assert official_walk([67], [35, 36]) == [35, 67, 36]  # slots 1, 3, 4
    # Inserted the other way round, 35 takes slot 3 and 67 moves: perturb = 67 >> 5 = 2, (15 + 1 + 2) & 7 = 2.
    assert official_walk([35], [67, 36]) == [67, 35, 36]  # slots 2, 3, 4: insertion order matters
    # Eight pivots: the fifth insertion fills 5 of 8 slots (5 * 5 >= 7 * 3), so the table grows to 32
    # (the smallest power of 2 above 4 * 5); mod 32 the positions 40 10 33 2 45 44 50 63 sit in slots
    # 8 10 1 2 13 12 18 31, no collisions: read in slot order.
    assert official_walk([40, 10, 33, 2], [45, 44, 50, 63]) == [33, 2, 40, 10, 44, 45, 50, 63]
    assert sorted([40, 10, 33, 2]) + sorted([45, 44, 50, 63]) != [33, 2, 40, 10, 44, 45, 50, 63]


# -- kept sets, by hand --------------------------------------------------------------------------------
HIDDEN = torch.tensor([[[1, 0], [0.9, 0.1], [-1, 0], [0, 1], [0, -1], [0.7, 0.7], [-0.7, 0.7], [1, 0.05]]])
KEYS = torch.tensor([[[5.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0]]])  # image token 0 is the pivot
TEXT = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])
TEXT_KEYS = torch.tensor([[[1.0], [2.0], [3.0]]])  # text token 2, (0, 1), is the text pivot


def hand_inputs(start: int | None) -> PruningInputs:
    positions = None if start is None else torch.arange(start, start + 8)[None]
    text_positions = None if start is None else torch.arange(start + 8, start + 11)[None]
    return PruningInputs(tokens=HIDDEN, grid=(2, 4), llm_keys=KEYS, text_tokens=TEXT, text_keys=TEXT_KEYS,
                         text_mask=torch.ones(1, 3, dtype=torch.bool), seq_index=positions, text_seq_index=text_positions)


def test_dart_kept_set_follows_the_set_order_by_hand():
    # budget official: floor(0.5 * 8 / 2) = 2 per pivot, 1 + 2 * 2 = 5 kept.
    # Image pivot ~ (1, 0) first: it takes the least similar 2 (cos -1) and 6 (-.71); the text pivot (0, 1)
    # then takes 4 (-1) and 7 (.05) of 1, 3, 4, 5, 7.
    image_first = [[0, 2, 4, 6, 7]]
    # Text pivot first: it takes 4 (-1) and 2 (0) of 1..7; the image pivot then takes 6 (-.71) and 3 (0)
    # of 1, 3, 5, 6, 7.
    text_first = [[0, 2, 3, 4, 6]]
    official = tp.create_pruner("dart", ratio=0.5, pivots_image=1, pivots_text=1)
    sequence = tp.create_pruner("dart", ratio=0.5, pivots_image=1, pivots_text=1, pivot_order="sequence")
    assert official.pivot_order == "official"
    # Image at 6..13, text at 14..16: the pivots sit at 6 and 16; set([6, 16]) holds 16 in slot 0, 6 in slot 6.
    assert official_walk([6], [16]) == [16, 6]
    assert official(hand_inputs(6)).indices.tolist() == text_first
    assert sequence(hand_inputs(6)).indices.tolist() == image_first
    # Image at 0..7, text at 8..10: pivots 0 and 10, slots 0 and 2 -- the set's order is the sequence's here.
    assert official_walk([0], [10]) == [0, 10]
    assert official(hand_inputs(0)).indices.tolist() == image_first
    # Without positions (inputs built by hand): as if the image opened the sequence, i.e. start 0.
    assert official(hand_inputs(None)).indices.tolist() == image_first
    # budget exact: round(0.5 * 8) = 4, 3 beyond the pivot: the first pivot visited takes 2, the second 1.
    exact = tp.create_pruner("dart", ratio=0.5, pivots_image=1, pivots_text=1, budget="exact")
    assert exact(hand_inputs(6)).indices.tolist() == [[0, 2, 4, 6]]  # text pivot: 4, 2; image pivot: 6
    assert exact(hand_inputs(0)).indices.tolist() == [[0, 2, 4, 6]]  # image pivot: 2, 6; text pivot: 4
    with pytest.raises(Exception, match="pivot_order"):
        tp.create_pruner("dart", pivot_order="sorted")


def test_dart_padded_text_pivots_are_left_out_of_the_set():
    # Sample 0 has one text token (the other two are padding, text_seq_index -1); sample 1 has three.
    tokens, keys = HIDDEN.expand(2, -1, -1), KEYS.expand(2, -1, -1)
    mask = torch.tensor([[False, False, True], [True, True, True]])
    inputs = PruningInputs(tokens=tokens, grid=(2, 4), llm_keys=keys, text_tokens=TEXT.expand(2, -1, -1),
                           text_keys=TEXT_KEYS.expand(2, -1, -1), text_mask=mask,
                           seq_index=torch.arange(6, 14).expand(2, -1),
                           text_seq_index=torch.tensor([[-1, -1, 14], [14, 15, 16]]))
    p = tp.create_pruner("dart", ratio=0.5, pivots_image=1, pivots_text=2)
    # official: floor(0.5 * 8 / 3) = 1 per pivot, 1 + 3 * 1 = 4 kept.
    # Sample 0: pivots image 6, text 14 ((0, 1)); the padded slot's quota moves to the first valid pivot.
    # set([6, 14]): 14 in slot 6 collides with 6, perturb 14 >> 5 = 0: (6 * 5 + 1) & 7 = 7 -> [6, 14].
    # Image pivot first takes 2 (-1) and 6 (-.71), then the text pivot takes 4 (-1).
    # Sample 1: pivots image 6, text 16 ((0, 1)) and 15 ((.5, .5)), in topk order; set([6, 16, 15]):
    # slots 6, 0, 7 -> [16, 6, 15]. (0, 1) takes 4; (1, 0) takes 2; (.5, .5) takes 6 (cos 0 vs 3's .71).
    assert official_walk([6], [14]) == [6, 14] and official_walk([6], [16, 15]) == [16, 6, 15]
    assert p(inputs).indices.tolist() == [[0, 2, 4, 6], [0, 2, 4, 6]]
    # budget exact (4 kept, 3 beyond the pivot): sample 1 as above; sample 0, two valid pivots, 2 + 1:
    # the image pivot takes 2 and 6, the text pivot 4.
    exact = tp.create_pruner("dart", ratio=0.5, pivots_image=1, pivots_text=2, budget="exact")
    assert exact(inputs).indices.tolist() == [[0, 2, 4, 6], [0, 2, 4, 6]]


# -- against the literal official loop, random inputs ---------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_num_trunction", [16, 32])
def test_dart_equals_the_literal_official_loop_on_random_inputs(seed, max_num_trunction):
    """A batch of samples with different image starts and text lengths (left-padded), each compared with
    the official function run on its own unpadded sequence (zeros before the image: never read)."""
    g = torch.Generator().manual_seed(seed)
    b, n, d, width, t_max = 5, 72, 16, 24, 10
    starts = torch.randint(0, 60, (b,), generator=g).tolist()
    lengths = torch.randint(4, t_max + 1, (b,), generator=g).tolist()
    hidden, text = torch.randn(b, n, d, generator=g), torch.randn(b, t_max, d, generator=g)
    keys, text_keys = torch.randn(b, n, width, generator=g), torch.randn(b, t_max, width, generator=g)
    norm = torch.nn.RMSNorm(d)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5, generator=g)
    text_mask = torch.arange(t_max)[None, :] >= (t_max - torch.tensor(lengths))[:, None]
    positions = torch.tensor(starts)[:, None] + torch.arange(n)
    text_positions = (positions[:, -1:] + text_mask.long().cumsum(1)).masked_fill(~text_mask, -1)
    inputs = PruningInputs(tokens=hidden, grid=(8, 9), llm_keys=keys, text_tokens=text, text_keys=text_keys,
                           text_mask=text_mask, final_norm=norm, seq_index=positions, text_seq_index=text_positions)
    ratio = max_num_trunction / n
    ours = tp.create_pruner("dart", ratio=ratio)(inputs).indices
    seq = tp.create_pruner("dart", ratio=ratio, pivot_order="sequence")(inputs).indices
    assert ours.shape[1] == 4 + 8 * (max_num_trunction // 8)
    differs = 0
    with torch.no_grad():
        for i, (s, t) in enumerate(zip(starts, lengths)):
            states = torch.cat([torch.zeros(s, d), norm(hidden[i]), norm(text[i, t_max - t:])])[None]
            k_all = torch.cat([torch.zeros(s, width), keys[i], text_keys[i, t_max - t:]])[None]
            ref = official_get_retained_image_token(states, k_all, s, n, max_num_trunction)
            assert ours[i].tolist() == sorted(p - s for p in ref.tolist())
            per_pivot = max_num_trunction // 8
            assert seq[i].tolist() == sequence_walk_reference(
                norm(hidden[i:i + 1]), keys[i:i + 1], text_keys[i:i + 1, t_max - t:], norm(text[i:i + 1, t_max - t:]), per_pivot)
            differs += ours[i].tolist() != seq[i].tolist()
    assert differs > 0  # the two orders do change kept sets here: the test tells them apart


# -- what the decoder hands the pruner -----------------------------------------------------------------
class Probe(TokenPruner):
    """Keeps everything; remembers its inputs."""

    stage = Stage.IN_LLM

    def __init__(self, ratio: float = 1.0):
        self.ratio = ratio
        self.seen: list[PruningInputs] = []

    @property
    def needs(self) -> PrunerNeeds:
        return PrunerNeeds(llm_stages=(LLMStage(layer=2, keys=True),))

    def select(self, inputs):
        self.seen.append(inputs)
        return Reduction(indices=torch.arange(inputs.num_tokens).expand(inputs.batch_size, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_seq_index_is_the_unpadded_sequence_index_on_every_family(family):
    lvlm = lvlm_for(family)
    imgs, prompts = images(), PROMPTS  # two prompts of different lengths: the shorter one is left-padded
    batch = lvlm.prepare(imgs, prompts)
    probe = Probe()
    lvlm.generate(imgs, prompts, pruner=probe, max_new_tokens=1, sample_ids=["a", "b"])
    seen = {sid: (inp, i) for inp in probe.seen for i, sid in enumerate(inp.sample_ids)}
    image = batch["input_ids"] == lvlm.model.config.image_token_id
    visual = torch.zeros_like(image)
    for v in lvlm.encode_images(batch, PrunerNeeds()):
        if v.prunable:
            visual[v.sample, v.seq_index] = True
    pads = (~batch["attention_mask"].bool()).sum(1)
    assert int(pads.max()) > 0  # padding exercised
    for b, sid in enumerate(["a", "b"]):
        inp, i = seen[sid]
        real = batch["attention_mask"][b].bool().nonzero().flatten()
        assert int(real[0]) == int(pads[b])  # left padding
        text_pos = real[real > image[b].nonzero().flatten()[-1]]
        assert inp.seq_index[i].tolist() == (visual[b].nonzero().flatten() - pads[b]).tolist()
        assert inp.text_seq_index[i][inp.text_mask[i]].tolist() == (text_pos - pads[b]).tolist()
        assert bool((inp.text_seq_index[i][~inp.text_mask[i]] == -1).all())
