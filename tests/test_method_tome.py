"""ToMe (``tome``): hand-computed slots on a 1 CLS + 6 token state; the official ``bipartite_soft_matching``,
``merge_wavg``, ``merge_source`` and ``parse_r`` transcribed verbatim (facebookresearch/ToMe@af95e4b) and compared
on random keys, hidden states and sizes through ``apply_reduction``; the whole official ToMe block loop (timm
``ToMeBlock`` / ``ToMeAttention``, and LightCompress's ``tome_CLIPEncoderLayer_forward``) re-implemented on the
tiny CLIP tower and compared with ``run_tower``; the budget solver against METHODS.md §2.1's LLaVA lists; bad
options refused in one line."""
from __future__ import annotations

import math
from typing import Callable, List, Tuple, Union

import pytest
import torch

import tokenprune.methods.tome as tome  # registers "tome" (methods/__init__.py does not import it yet)
from tokenprune import create_pruner
from tokenprune.adapters.vision_blocks import apply_reduction, run_tower
from tokenprune.errors import OptionError
from tokenprune.in_vision import VisionState
from tokenprune.pruner import keep_count
from tokenprune.zoo.tiny import tiny_llava

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ---- official code, verbatim: facebookresearch/ToMe@af95e4b tome/merge.py (L14-97, L210-239), tome/utils.py ----

def do_nothing(x, mode=None):
    return x


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
) -> Tuple[Callable, Callable]:
    protected = 0
    if class_token:
        protected += 1
    if distill_token:
        protected += 1

    # We can only reduce by a maximum of 50% tokens
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)

    if r <= 0:
        return do_nothing, do_nothing

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)

        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]

        unm_idx = edge_idx[..., r:, :]  # Unmerged Tokens
        src_idx = edge_idx[..., :r, :]  # Merged Tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

        if class_token:
            # Sort to ensure the class token is at the start
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode="mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)

        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        else:
            return torch.cat([unm, dst], dim=1)

    return merge, None  # (unmerge not used here)


def merge_wavg(
    merge: Callable, x: torch.Tensor, size: torch.Tensor = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    if size is None:
        size = torch.ones_like(x[..., 0, None])

    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")

    x = x / size
    return x, size


def merge_source(
    merge: Callable, x: torch.Tensor, source: torch.Tensor = None
) -> torch.Tensor:
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)

    source = merge(source, mode="amax")
    return source


def official_parse_r(num_layers: int, r: Union[List[int], Tuple[int, float], int]) -> List[int]:
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    elif isinstance(r, tuple):
        r, inflect = r

    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)

    return [int(min_val + step * i) for i in range(num_layers)]


# ---- the official block loop on a Hugging Face CLIP tower ----
# tome/patch/timm.py ToMeAttention.forward (qkv split into CLIP's q/k/v projections) and ToMeBlock.forward;
# LightCompress@9701d03 llmc/compression/token_reduction/tome.py tome_CLIPEncoderLayer_forward (size=None each layer,
# plain attention).

def tome_attention(attn, x: torch.Tensor, size: torch.Tensor = None) -> Tuple[torch.Tensor, torch.Tensor]:
    B, N, C = x.shape
    q = attn.q_proj(x).reshape(B, N, attn.num_heads, C // attn.num_heads).permute(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, N, attn.num_heads, C // attn.num_heads).permute(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, N, attn.num_heads, C // attn.num_heads).permute(0, 2, 1, 3)
    a = (q @ k.transpose(-2, -1)) * attn.scale
    # Apply proportional attention
    if size is not None:
        a = a + size.log()[:, None, None, :, 0]
    a = a.softmax(dim=-1)
    x = (a @ v).transpose(1, 2).reshape(B, N, C)
    x = attn.out_proj(x)
    return x, k.mean(1)


def official_tower(tower, pixel_values: torch.Tensor, r_list: List[int], n_run: int, prop_attn: bool,
                   lightcompress: bool = False, class_token: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The tower's output after ``n_run`` ToMe blocks, and the official ``_tome_info["size"]`` (None: no merge).
    CLIP (``pre_layrnorm``, CLS) or SigLIP (neither: ``class_token=False``)."""
    vm = getattr(tower, "vision_model", tower)
    x = vm.embeddings(pixel_values)
    x = vm.pre_layrnorm(x) if class_token else x
    info = {"r": list(r_list), "size": None, "prop_attn": prop_attn, "class_token": class_token, "distill_token": False}
    for block in vm.encoder.layers[:n_run]:
        attn_size = info["size"] if info["prop_attn"] else None
        x_attn, metric = tome_attention(block.self_attn, block.layer_norm1(x), attn_size)
        x = x + x_attn
        r = info["r"].pop(0)
        if r > 0:
            merge, _ = bipartite_soft_matching(metric, r, info["class_token"], info["distill_token"])
            if lightcompress:
                x, _ = merge_wavg(merge, x)
            else:
                x, info["size"] = merge_wavg(merge, x, info["size"])
        x = x + block.mlp(block.layer_norm2(x))
    return x, info["size"]


# ---- helpers ----

def state(keys: torch.Tensor, hidden: torch.Tensor, prefix: int, sizes: torch.Tensor | None = None,
          target: int = 1, n_blocks: int = 1, block: int = 0) -> VisionState:
    b, t, _ = hidden.shape
    p = t - prefix
    return VisionState(hidden=hidden, prefix=prefix, grid=(1, p), block=block, point="attention", n_blocks=n_blocks,
                       target=target, sizes=torch.ones(b, t) if sizes is None else sizes,
                       origin=(torch.arange(t) - prefix).clamp_min(-1).expand(b, -1).clone(), keys=keys)


def run(red, st: VisionState):
    b, t, _ = st.hidden.shape
    members = (torch.arange(t - st.prefix) + st.prefix).expand(b, -1).clone()
    return apply_reduction(red, st.hidden, st.sizes, st.origin, members)


KEYS = torch.tensor([[1.0, 0, 0],   # 0: CLS (its best match, token 1, is masked)
                     [1.0, 0, 0],   # 1 (b)
                     [1.0, 0.1, 0],  # 2 (a): cos 0.995 with 1
                     [0.0, 1, 0],   # 3 (b)
                     [0.0, 1, 2],   # 4 (a): cos 0.894 with 5
                     [0.0, 0, 1],   # 5 (b)
                     [0.2, 1, 0.1]])[None]  # 6 (a): cos 0.976 with 3
HIDDEN = torch.tensor([10.0, 20, 30, 40, 50, 60, 70])[None, :, None]
SIZES = torch.tensor([[1.0, 1, 2, 1, 3, 1, 1]])


# ---- (1) by hand ----

def test_hand_computed_slots_with_cls():
    """a = 0, 2, 4, 6; b = 1, 3, 5. node_max: CLS -inf, 2 -> 1 (0.995), 6 -> 3 (0.976), 4 -> 5 (0.894); r=2
    merges 2 and 6. New order [CLS, 4 | 1, 3, 5]: slots 0, 2, 2, 3, 1, 4, 3."""
    st = state(KEYS, HIDDEN, prefix=1, sizes=SIZES.clone())
    red = create_pruner("tome", r=2).select(st)
    assert red.slots.tolist() == [[0, 2, 2, 3, 1, 4, 3]] and red.length == 5 and red.weights is None
    h, s, o, _ = run(red, st)
    assert h[0, :, 0].tolist() == pytest.approx([10, 50, (20 + 2 * 30) / 3, (40 + 70) / 2, 60])
    assert s.tolist() == [[1, 3, 3, 2, 1]] and o.tolist() == [[-1, 3, 0, 2, 4]]
    # LightCompress: unweighted means of the current tokens, sizes back to 1
    red = create_pruner("tome", r=2, variant="lightcompress").select(st)
    assert red.slots.tolist() == [[0, 2, 2, 3, 1, 4, 3]] and red.reset_sizes
    h, s, o, _ = run(red, st)
    assert h[0, :, 0].tolist() == pytest.approx([10, 50, 25, 55, 60]) and s.tolist() == [[1.0] * 5]


def test_hand_computed_slots_without_prefix():
    """No class token: token 0 may merge (cos 1 with token 1, the best); r=1. The unmerged a tokens keep the
    official node_max order, not index order: 2 (0.995), 6 (0.976), 4 (0.894), then b 1, 3, 5."""
    st = state(KEYS, HIDDEN, prefix=0)
    red = create_pruner("tome", r=1).select(st)
    assert red.slots.tolist() == [[3, 3, 0, 4, 2, 5, 1]] and red.length == 6
    h, *_ = run(red, st)
    assert h[0, :, 0].tolist() == pytest.approx([30, 70, 50, 15, 40, 60])


def test_r_clipped_as_official_and_ratio_one_is_a_no_op():
    assert create_pruner("tome", r=99).select(state(KEYS, HIDDEN, prefix=1)).length == 4  # min(99, (7 - 1) // 2) = 3
    assert create_pruner("tome", r=0).select(state(KEYS, HIDDEN, prefix=1)) is None
    full = create_pruner("tome", ratio=1.0)
    assert full.select(state(KEYS, HIDDEN, prefix=1, target=6, n_blocks=3)) is None and full.vision_hooks(23) == ()
    assert [h.block for h in create_pruner("tome", r=[0, 4, 0, 2]).vision_hooks(6)] == [1, 3]
    hooks = create_pruner("tome").vision_hooks(3)
    assert [(h.block, h.point, h.keys) for h in hooks] == [(i, "attention", True) for i in range(3)]


# ---- (2) against the official bipartite_soft_matching + merge_wavg (+ merge_source for positions) ----

@pytest.mark.parametrize("prefix", [0, 1, 2])  # none (SigLIP), class token, class + distillation token
@pytest.mark.parametrize("r", [1, 7, 20, 100])
@pytest.mark.parametrize("n_tokens", [41, 50])
def test_matches_official_merge(prefix, r, n_tokens):
    g = torch.Generator().manual_seed(100 * prefix + r + n_tokens)
    b, d = 3, 16
    keys = torch.randn(b, n_tokens, 8, generator=g)
    hidden = torch.randn(b, n_tokens, d, generator=g)
    sizes = torch.randint(1, 6, (b, n_tokens), generator=g).float()
    sizes[:, :prefix] = 1
    merge, _ = bipartite_soft_matching(keys, r, class_token=prefix > 0, distill_token=prefix > 1)
    ref_x, ref_size = merge_wavg(merge, hidden, sizes[..., None])
    source = merge_source(merge, hidden)  # [B, T', T]: which original tokens each new one covers
    st = state(keys, hidden, prefix, sizes=sizes)
    h, s, o, m = run(create_pruner("tome", r=r).select(st), st)
    torch.testing.assert_close(h, ref_x, rtol=0, atol=1e-5)
    assert torch.equal(s, ref_size[..., 0])
    first = source.argmax(-1) - prefix  # the earliest token each new token covers
    assert torch.equal(o, torch.where(first < 0, -1, first))
    assert torch.equal(m, source[:, :, prefix:].argmax(1))  # each patch's new token
    # LightCompress: merge_wavg(merge, x), size=None
    red = create_pruner("tome", r=r, variant="lightcompress").select(st)
    h, s, *_ = run(red, st)
    torch.testing.assert_close(h, merge_wavg(merge, hidden)[0], rtol=0, atol=1e-5)
    assert torch.equal(s, torch.ones_like(s))


# ---- (3) the whole official block loop on the tiny CLIP tower ----

@pytest.fixture(scope="module")
def tower():
    model, _ = tiny_llava()
    return model.model.vision_tower.eval()


@pytest.mark.parametrize("options,feature_layer", [
    (dict(ratio=0.3), -2),  # solved [26, 19]: block 0 above the even share (block 1 can merge 19 at most)
    (dict(r=13), -1),
    (dict(r=30), -1),  # clipped: 30, 17, 8
    (dict(r=[0, 12, 9]), -1),  # no merge in block 0: no proportional attention there
    (dict(r=(8, -1.0)), -1),  # parse_r: [16, 8, 0]
    (dict(ratio=0.3, prop_attn=False), -2),
    (dict(ratio=0.3, variant="lightcompress"), -2),
    (dict(r=30, variant="lightcompress"), -1),
])
def test_tower_matches_official_block_loop(tower, options, feature_layer):
    pruner = create_pruner("tome", **options)
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    n_run = feature_layer % 4
    with torch.no_grad():
        out = run_tower(tower, px, pruner, feature_layer, prefix=1)
        if "r" in options:
            r_list = official_parse_r(n_run, options["r"])
        else:
            r_list = tome.solve_r(64, keep_count(options["ratio"], 64), n_run)
        lightcompress = options.get("variant") == "lightcompress"
        prop_attn = not lightcompress and options.get("prop_attn", True)  # the official default: prop_attn=True
        ref, size = official_tower(tower, px, r_list, n_run, prop_attn=prop_attn, lightcompress=lightcompress)
    assert out.features.shape == ref.shape
    torch.testing.assert_close(out.features, ref, rtol=0, atol=1e-5)
    assert out.features.shape[1] - 1 == pruner.num_kept(64, (8, 8)) == pruner.kept_count(64, n_run)
    if pruner.r is None:
        assert out.features.shape[1] - 1 == keep_count(pruner.ratio, 64)
    if lightcompress or size is None:
        assert torch.equal(out.sizes, torch.ones_like(out.sizes))
    else:
        assert torch.equal(out.sizes, size[:, 1:, 0]) and out.sizes.sum().item() == 2 * 64


@pytest.mark.parametrize("options", [dict(ratio=0.3), dict(r=30, variant="lightcompress")])
def test_siglip_tower_without_class_token(options):
    """No CLS: every token may merge and the unmerged ones keep the official node_max order."""
    model, _ = tiny_llava(vision=dict(model_type="siglip_vision_model"))
    tower = model.model.vision_tower.eval()
    pruner = create_pruner("tome", **options)
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = run_tower(tower, px, pruner, -1, prefix=0)
        r_list = official_parse_r(3, options["r"]) if "r" in options else tome.solve_r(64, 19, 3)
        ref, size = official_tower(tower, px, r_list, 3, prop_attn="r" not in options,
                                   lightcompress="r" in options, class_token=False)
    torch.testing.assert_close(out.features, ref, rtol=0, atol=1e-5)
    if "r" not in options:
        assert out.features.shape[1] == 19 and torch.equal(out.sizes, size[..., 0])


def test_solved_schedule_on_the_tiny_tower(tower):
    assert tome.solve_r(64, keep_count(0.3, 64), 2) == [26, 19]
    with torch.no_grad():
        px = torch.randn(1, 3, 64, 64)
        assert run_tower(tower, px, create_pruner("tome", ratio=1.0), -2, 1).features.shape[1] == 65
        with pytest.raises(OptionError, match=r"smallest reachable ratio is 0\.25 \(16 tokens\)"):
            run_tower(tower, px, create_pruner("tome", ratio=0.2), -2, 1)


# ---- (4) the budget solver ----

def test_solver_reproduces_the_lightcompress_llava_lists():
    assert tome.solve_r(576, 192, 23) == [17] * 16 + [16] * 7
    assert tome.solve_r(576, 128, 23) == [20] * 11 + [19] * 12
    assert tome.solve_r(576, 64, 23) == [23] * 6 + [22] * 17
    for ratio, kept in [(1 / 3, 192), (2 / 9, 128), (1 / 9, 64)]:
        assert create_pruner("tome", ratio=ratio).num_kept(576, (24, 24)) == kept
    # METHODS.md §2.1: constant r on 23 blocks of 576 patches
    for r, kept in [(16, 208), (17, 185), (19, 139), (22, 70)]:
        assert create_pruner("tome", r=r).kept_count(576, 23) == kept


def test_solver_is_exact_wherever_reachable():
    for n_patches, n_blocks in [(576, 23), (64, 2), (64, 3), (729, 26), (10, 1), (7, 4)]:
        floor = tome.fewest_reachable(n_patches, n_blocks)
        assert floor == math.ceil(n_patches / 2 ** n_blocks)
        for target in range(floor, n_patches + 1):
            rs = tome.solve_r(n_patches, target, n_blocks)
            n = n_patches
            for r in rs:
                assert 0 <= r <= n // 2
                n -= r
            assert n == target and len(rs) == n_blocks
        if floor > 1:
            with pytest.raises(OptionError, match="smallest reachable ratio"):
                tome.solve_r(n_patches, floor - 1, n_blocks)


def test_parse_r_is_the_official():
    for n, r in [(12, 16), (12, (16, -1.0)), (12, (16, 0.5)), (23, (8, 1.0)), (5, [3, 2]), (24, (13, -0.3))]:
        assert tome.parse_r(n, r) == official_parse_r(n, r)


# ---- (5) options ----

@pytest.mark.parametrize("options", [
    dict(r=-1), dict(r=[3, -2]), dict(r=[]), dict(r="16"), dict(r=1.5), dict(r=True), dict(r=(16, 2.0)),
    dict(r=(1, 2, 3)),
    dict(variant="timm"), dict(ratio=0), dict(ratio=1.5), dict(prop_attn="yes"),
    dict(variant="lightcompress", prop_attn=True),
])
def test_bad_options_are_refused_in_one_line(options):
    with pytest.raises(OptionError) as err:
        create_pruner("tome", **options)
    assert "\n" not in str(err.value)


def test_options_and_flags():
    p = create_pruner("tome")
    assert (p.ratio, p.r, p.variant, p.proportional_attention, p.uses_ratio) == (0.5, None, "official", True, True)
    assert create_pruner("tome", prop_attn=False).proportional_attention is False
    assert create_pruner("tome", variant="lightcompress").proportional_attention is False
    assert create_pruner("tome", r=16.0).r == 16 and create_pruner("tome", r=16).uses_ratio is False
    with pytest.raises(OptionError, match="depth"):
        create_pruner("tome", r=16).num_kept(576, (24, 24))
