"""``gprune``: G-Prune's graph information flow, as the official code (jytmelon/G-Prune@762c637) does it.

What is checked, against independent references:
1. hand-computed graphs on 3-4 tokens, the softmax entries and the matrix power written out in plain Python
   (expected scores and kept indices in the comments): the threshold, the degree, the norm flow, the effect of
   ``iterations`` and ``temperature``, the exact-zero-cosine quirk, the ``int()`` count, fp16 degree underflow;
2. the official LLaVA-NeXT function (``llava_arch.py`` L239-287) and the UniPruneBench port
   (``methods/GPrune_PreLLM.py``, TianfanPeng/VLMUniPruneBench@f93768f) transcribed near-verbatim, on random
   clustered features: identical kept indices (base + high-res graphs, every newline kept; fp32 and fp16);
3. the official pipelines on the tiny models' own tensors: LLaVA-NeXT (``spatial_unpad`` + ``anyres``: base
   view, unpadded high-res rows with newlines, the official two graphs), LLaVA-1.5 (one graph), Qwen2.5-VL
   (the port's ``select_important_features`` on the merger outputs), InternVL (the port's first-tile / rest
   split, ``graphs=first_rest``) == what the adapter + pruner place, at the original positions;
4. every family's tiny model (images; videos on the video families): ratio 1.0 == unpruned, the tokens each
   decoder layer receives (pre-hooks) == text + the budget, cached == uncached, batch == alone
   (``tests/video_checks.py``), at the default scope, at ``clip`` and with ``graphs=first_rest``;
5. the contract, options, position conventions and one-line errors.
"""
from __future__ import annotations

import math

import pytest
import torch

import tokenprune as tp
import tokenprune.methods.gprune  # noqa: F401  (registers the pruner until methods/__init__ imports it)
from tokenprune.errors import OptionError
from tokenprune.methods.gprune import gprune_graph_scores
from tokenprune.pruner import PruningInputs
from tokenprune.testing import check_pruner_contract, synthetic_inputs
from test_adapters import images
from test_video_scope import PROMPTS, VIDEO_FAMILIES, lvlm_for, video
from video_checks import check_pruner_on

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def gprune(ratio: float = 0.5, **kw):
    return tp.create_pruner("gprune", ratio=ratio, **kw)


def run(p, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` as one view (``grid (1, N)``) -> kept indices ``[B, k]``."""
    return p(PruningInputs(tokens=tokens, grid=(1, tokens.shape[1]))).indices


# -- 1. by hand ------------------------------------------------------------------------------------------------
def matmul(a, b):
    return [[sum(a[i][t] * b[t][j] for t in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def hand_scores(cos, norms, temperature, power):
    """The official steps on a hand-written cosine matrix, in plain Python: threshold .5, / T, non-edges at
    -5000, row softmax, degree, ``A @ A @ ... @ A`` (``power`` factors written out), ``W @ A^p / deg``."""
    n = len(cos)
    logits = [[c / temperature if c >= 0.5 and c != 0 else -5000.0 for c in row] for row in cos]
    a = []
    for row in logits:
        m = max(row)
        e = [math.exp(v - m) for v in row]
        a.append([v / sum(e) for v in e])
    deg = [sum(v > 0 for v in row) for row in a]
    p = [[float(i == j) for j in range(n)] for i in range(n)]
    for _ in range(power):
        p = matmul(p, a)
    flow = matmul([norms], p)[0]
    return [f / d for f, d in zip(flow, deg)], deg


def four_tokens() -> tuple[torch.Tensor, list[list[float]], list[float]]:
    # t0 = 1 (1, 0, 0), t1 = 1 (.8, .6, 0), t2 = 3 (0, 0, 1), t3 = 2 (.6, .8, 0):
    # cos(0,1) = .8, cos(0,3) = .6, cos(1,3) = .96, t2 orthogonal to all (cos exactly 0).
    units = [(1.0, 0.0, 0.0), (0.8, 0.6, 0.0), (0.0, 0.0, 1.0), (0.6, 0.8, 0.0)]
    norms = [1.0, 1.0, 3.0, 2.0]
    tokens = torch.tensor([[[n * u for u in unit] for unit, n in zip(units, norms)]], dtype=torch.float64)
    cos = [[sum(x * y for x, y in zip(u, v)) for v in units] for u in units]
    return tokens, cos, norms


def test_hand_computed_official_constants():
    tokens, cos, norms = four_tokens()
    scores, deg = gprune_graph_scores(tokens)
    # degrees: t0, t1, t3 are each other's neighbours (cos >= .5), t2 only itself: 3, 3, 1, 3
    assert deg.tolist() == [[3, 3, 1, 3]]
    # T = .03: logits cos / .03; row 1 = (26.67, 33.33, -5000, 32) -> e^{-6.67}, 1, 0, e^{-1.33} over 1.2649 =
    # [.0010, .7906, 0, .2084]; row 3 = [.0000, .2086, 0, .7914]; row 0 = [.9987, .0013, 0, .0000]; row 2 = e2.
    # Without flow (norm / deg) t3 (2/3) beats t1 (1/3); A^5 moves part of t3's norm to t1: scores
    # .3334, .4890, 3.0, .5110 -- t2 (isolated, norm 3) first, t3 second: ratio .5 keeps int(.5 * 4) = 2 -> [2, 3];
    # ratio .25 keeps 1 -> [2]; ratio .75 keeps 3 -> [1, 2, 3].
    ref, _ = hand_scores(cos, norms, 0.03, 5)
    torch.testing.assert_close(scores[0], torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert [round(s, 4) for s in ref] == [0.3334, 0.489, 3.0, 0.511]
    assert run(gprune(0.5), tokens).tolist() == [[2, 3]]
    assert run(gprune(0.25), tokens).tolist() == [[2]]
    assert run(gprune(0.75), tokens).tolist() == [[1, 2, 3]]


def test_hand_computed_iterations_and_temperature_change_the_winner():
    tokens, cos, norms = four_tokens()
    # T = 1 (a soft softmax): A[0] = [.4018, .3289, 0, .2693], A[1] = [.2946, .3598, 0, .3457],
    # A[3] = [.2548, .3652, 0, .3801] (each e^{cos} over its row's edges), A[2] = e2.
    # iterations 0: score = norm / deg = .3333, .3333, 3, .6667 -> top 2 = [2, 3];
    # iterations 1: W @ A = [1.2059, 1.4190, 3, 1.3751] / 3 = .4020, .4730, 3, .4584 -> t1, the middle of the
    # chain, overtakes t3: [1, 2]; iterations 5: .4201, .4691, 3, .4441 -> [1, 2].
    for power, expected in [(0, [[2, 3]]), (1, [[1, 2]]), (5, [[1, 2]])]:
        ref, _ = hand_scores(cos, norms, 1.0, power)
        got, _ = gprune_graph_scores(tokens, temperature=1.0, iterations=power)
        torch.testing.assert_close(got[0], torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert run(gprune(0.5, temperature=1.0, iterations=power), tokens).tolist() == expected
    assert [round(s, 4) for s in hand_scores(cos, norms, 1.0, 1)[0]] == [0.402, 0.473, 3.0, 0.4584]
    assert [round(s, 4) for s in hand_scores(cos, norms, 1.0, 5)[0]] == [0.4201, 0.4691, 3.0, 0.4441]


def test_exact_zero_cosine_is_never_an_edge():
    # cos(0,1) = 0, cos(0,2) = -.6, cos(1,2) = .8. similarity=-1 zeroes nothing, but the official
    # `A[abs(A) < 1e-6] = -5000` still removes the exact zero (0-1); the cosine -.6 (logit -20, probability
    # e^{-53} in float64) stays an edge: degrees 2 (0, 2), 2 (1, 2), 3.
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]]], dtype=torch.float64)
    _, deg = gprune_graph_scores(tokens, similarity=-1.0)
    assert deg.tolist() == [[2, 2, 3]]
    _, deg = gprune_graph_scores(tokens)  # the official threshold .5: only the edge 1-2
    assert deg.tolist() == [[1, 2, 2]]


def test_count_is_the_official_int_or_keep_count():
    p, r = gprune(0.29), gprune(0.29, rounding="round")
    assert p.num_kept(100, (10, 10)) == 28 == int(0.29 * 100)  # Python's 28.999999999999996, floored as official
    assert r.num_kept(100, (10, 10)) == 29
    assert gprune(0.111).num_kept(576, (24, 24)) == 63 and gprune(0.111, rounding="round").num_kept(576, (24, 24)) == 64
    assert gprune(0.5).num_kept(576, (24, 24)) == 288 and gprune(0.001).num_kept(576, (24, 24)) == 1  # max(1, .)
    assert p.quantised and not r.quantised


def test_fp16_probabilities_underflow_out_of_the_degree():
    # 20 copies of e0 and one token u at cos .55 with e0. A copy's row: the diagonal and 19 copies at 1/.03, u at
    # .55/.03: p(u) = e^{-15} / 20 = 1.5e-8, below fp16's smallest subnormal / 2 (3e-8) -> 0: degree 20 in fp16,
    # 21 in fp32. u's own row (Z ~ 1): p = e^{-15} = 3e-7, representable: degree 21 in both.
    u = torch.tensor([0.55, math.sqrt(1 - 0.55 ** 2)])
    tokens = torch.cat([torch.tensor([[1.0, 0.0]]).expand(20, -1) * torch.linspace(1, 2, 20)[:, None], u[None]])[None]
    _, deg32 = gprune_graph_scores(tokens)
    _, deg16 = gprune_graph_scores(tokens.half())
    assert deg32[0].tolist() == [21] * 21
    assert deg16[0].tolist() == [20] * 20 + [21]
    # precision="model" scores fp16 tokens in fp16 (the official), "float32" upcasts: the degrees show in the scores
    half = PruningInputs(tokens=tokens.half(), grid=(1, 21))
    s16 = gprune(0.5).select(half).scores
    s32 = gprune(0.5, precision="float32").select(half).scores
    torch.testing.assert_close(s32, gprune_graph_scores(tokens.half().float())[0])
    assert not torch.allclose(s16, s32, rtol=1e-2)


# -- 2. the official functions ---------------------------------------------------------------------------------
def official_gprune_next(image_feature, row_num, col_num, image1_token_length=576, similarity=0.5, keep_ratio=0.5,
                         temperature=0.03, iterate_num=5):
    """jytmelon/G-Prune@762c637 LLaVA-NeXT/llava/model/llava_arch.py L239-287. ``image_feature``: the base view's
    tokens, then the unpadded high-res rows, each ended by a newline token. Only the hard-coded 576 and the
    constants are parameters; ``self.device`` is the features' device. Returns ``image_keep_indices``."""
    device = image_feature.device
    image2_token_length = row_num * (col_num + 1)
    mask = torch.zeros(row_num, col_num + 1).to(device)
    mask[:, -1] = 1
    mask = mask.flatten()
    image_token_index1 = torch.arange(0, image1_token_length, device=device)
    image_token_index2 = torch.where(mask == 0)[0] + image1_token_length
    row_end_token_index = torch.where(mask == 1)[0] + image1_token_length
    assert image_feature.shape[0] == image1_token_length + image2_token_length
    image1_feature_normalized = torch.nn.functional.normalize(image_feature[image_token_index1], p=2, dim=1)
    image2_feature_normalized = torch.nn.functional.normalize(image_feature[image_token_index2], p=2, dim=1)
    A1 = image1_feature_normalized @ image1_feature_normalized.t()
    A2 = image2_feature_normalized @ image2_feature_normalized.t()
    A1[A1 < similarity] = 0
    A2[A2 < similarity] = 0
    A1 = A1 / temperature
    A2 = A2 / temperature
    A1[abs(A1) < 1e-6] = -5000
    A2[abs(A2) < 1e-6] = -5000
    A1 = torch.nn.functional.softmax(A1, dim=1)
    A2 = torch.nn.functional.softmax(A2, dim=1)
    Degree1 = torch.sum(A1 > 0, dim=1)
    Degree2 = torch.sum(A2 > 0, dim=1)
    A1 = torch.matrix_power(A1, iterate_num)
    A2 = torch.matrix_power(A2, iterate_num)
    W1 = torch.norm(image_feature[image_token_index1], dim=-1).view(1, -1).to(dtype=A1.dtype)
    W2 = torch.norm(image_feature[image_token_index2], dim=-1).view(1, -1).to(dtype=A2.dtype)
    result1 = W1 @ A1
    result2 = W2 @ A2
    result1 = result1 / Degree1
    result2 = result2 / Degree2
    keep_indices1 = result1.topk(int(keep_ratio * image1_token_length)).indices
    keep_indices1 = image_token_index1[keep_indices1]
    keep_indices1 = keep_indices1.flatten()
    keep_indices2 = result2.topk(int(keep_ratio * row_num * col_num)).indices
    keep_indices2 = image_token_index2[keep_indices2]
    keep_indices2 = keep_indices2.flatten()
    image_keep_indices = torch.sort(torch.cat((keep_indices1, keep_indices2, row_end_token_index), dim=0))[0]
    return image_keep_indices


def upb_select_important_features(img_fea, keep_ratio, similarity, temperature, iterate_num):
    """TianfanPeng/VLMUniPruneBench@f93768f methods/GPrune_PreLLM.py ``select_important_features``, unchanged."""
    normalized = torch.nn.functional.normalize(img_fea, p=2, dim=1)
    A = normalized @ normalized.t()
    A[A < similarity] = 0
    A = A / temperature
    A[torch.abs(A) < 1e-6] = -5000
    A = torch.nn.functional.softmax(A, dim=1)
    degree = torch.sum(A > 0, dim=1)
    A = torch.matrix_power(A, iterate_num)
    W = torch.norm(img_fea, dim=-1).view(1, -1).to(dtype=A.dtype)
    result = W @ A
    result = result / degree
    keep_num = max(1, int(keep_ratio * img_fea.shape[0]))
    keep_idx = result.topk(keep_num).indices.flatten()
    return keep_idx


def upb_gprune_prune_pre_llm(selected, vit_embeds, similarity=0.5, keep_ratio=0.5, temperature=0.03, iterate_num=5):
    """VLMUniPruneBench@f93768f methods/GPrune_PreLLM.py ``gprune_prune_pre_llm`` (the InternVL3 hook); the
    environment variables are parameters. ``vit_embeds`` ``[tiles, tokens, C]``; returns ``(selected, kept,
    kept flat indices)`` -- the indices added here, from the two sorted selections, for the position check."""
    hidden_dim = vit_embeds.shape[-1]
    patch_num, patch_size = vit_embeds.shape[:2]
    if patch_num == 1:
        image_feature = vit_embeds.reshape(-1, hidden_dim)
        keep_indices = upb_select_important_features(image_feature, keep_ratio, similarity, temperature, iterate_num)
        sorted_keep_indices = torch.sort(keep_indices)[0]
        vit_embeds = image_feature[sorted_keep_indices, :]
        keep_num = sorted_keep_indices.shape[0]
        flat = sorted_keep_indices
    else:
        base = vit_embeds[0]
        patch = vit_embeds[1:].reshape(-1, hidden_dim)
        keep_indices1 = upb_select_important_features(base, keep_ratio, similarity, temperature, iterate_num)
        sorted_keep1 = torch.sort(keep_indices1)[0]
        pruned_base = base[sorted_keep1, :]
        keep_num_base = sorted_keep1.shape[0]
        keep_indices2 = upb_select_important_features(patch, keep_ratio, similarity, temperature, iterate_num)
        sorted_keep2 = torch.sort(keep_indices2)[0]
        pruned_patch = patch[sorted_keep2, :]
        keep_num_patch = sorted_keep2.shape[0]
        vit_embeds = torch.cat([pruned_base, pruned_patch], dim=0)
        keep_num = keep_num_base + keep_num_patch
        flat = torch.cat([sorted_keep1, patch_size + sorted_keep2])
    image_start = torch.where(selected == True)[0][0]  # noqa: E712  (verbatim)
    selected[image_start + keep_num:] = False
    return selected, vit_embeds, flat


def clustered(seed: int, b: int, n: int, d: int = 24, clusters: int = 5) -> torch.Tensor:
    """``[B, N, D]`` tokens around a few centres with token-wise noise and norms, so that cosines spread across
    the 0.5 threshold and degrees differ (plain Gaussian tokens would all be near-orthogonal: no edges)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, clusters, d, generator=g)
    member = torch.randint(clusters, (b, n), generator=g)
    noise = torch.rand(b, n, 1, generator=g) * 1.5
    x = centres.gather(1, member[..., None].expand(-1, -1, d)) + noise * torch.randn(b, n, d, generator=g)
    return x * (0.5 + 2 * torch.rand(b, n, 1, generator=g))


def next_layout(seed: int, b: int, base: int, rows: int, cols: int, dtype=torch.float32):
    """Random LLaVA-NeXT image blocks: ``(base tokens [B, base, D], high-res tokens [B, rows*cols, D], the official
    layout [B, base + rows*(cols+1), D])``, the newline (one vector) ending every high-res row."""
    x = clustered(seed, b, base + rows * cols)
    newline = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(seed + 99))
    hi = x[:, base:].view(b, rows, cols, -1)
    block = torch.cat([x[:, :base], torch.cat([hi, newline.expand(b, rows, 1, -1)], 2).flatten(1, 2)], 1)
    return x[:, :base].to(dtype), x[:, base:].to(dtype), block.to(dtype)


def ours_next(p, base: torch.Tensor, hi: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Our two views (each its own call, as scope frame does) mapped to the official image block's indices, the
    row newlines (never candidates) added."""
    nb = base.shape[1]
    kb = p(PruningInputs(tokens=base, grid=(round(nb ** 0.5), round(nb ** 0.5)))).indices
    kh = p(PruningInputs(tokens=hi, grid=(rows, cols))).indices
    kh = nb + (kh // cols) * (cols + 1) + kh % cols
    newlines = nb + torch.arange(rows) * (cols + 1) + cols
    return torch.cat([kb, kh, newlines.expand(base.shape[0], -1)], 1).sort(1).values


# (base side, high-res rows, cols, ratio, temperature): the official 24x24 base and a 36x48 unpadded grid at the
# official 0.5 and two budgets; smaller grids at uneven counts (int() floors) and a soft temperature
NEXT_CASES = [(24, 36, 48, 0.5, 0.03), (24, 30, 40, 0.111, 0.03), (12, 10, 17, 0.3, 0.03), (8, 7, 9, 0.25, 0.3),
              (6, 5, 7, 0.5, 1.0)]


@pytest.mark.parametrize("side, rows, cols, ratio, temperature", NEXT_CASES)
def test_equals_official_next_on_random_inputs(side, rows, cols, ratio, temperature):
    b = 2
    base, hi, block = next_layout(side + rows, b, side * side, rows, cols)
    p = gprune(ratio, temperature=temperature)
    ours = ours_next(p, base, hi, rows, cols)
    for i in range(b):
        ref = official_gprune_next(block[i], rows, cols, side * side, keep_ratio=ratio, temperature=temperature)
        assert ours[i].tolist() == ref.tolist()


def test_the_random_cases_are_not_a_plain_norm_ranking():
    """The graph matters: on these inputs the kept tokens differ from the top norms and from norm / degree."""
    differs_norm = differs_degree = 0
    for side, rows, cols, ratio, temperature in NEXT_CASES:
        _, hi, _ = next_layout(side + rows, 2, side * side, rows, cols)
        k = gprune(ratio).num_kept(rows * cols, (rows, cols))
        got = run(gprune(ratio, temperature=temperature), hi)
        by_norm = tp.topk_indices(hi.norm(dim=-1), k)
        no_flow = run(gprune(ratio, temperature=temperature, iterations=0), hi)
        differs_norm += int((got != by_norm).any(1).sum())
        differs_degree += int((got != no_flow).any(1).sum())
        _, deg = gprune_graph_scores(hi)
        assert int(deg.max()) > 3  # real neighbourhoods
    assert differs_norm >= 8 and differs_degree >= 4


@pytest.mark.parametrize("seed", range(3))
def test_equals_official_next_in_fp16(seed):
    """precision="model" on fp16 tokens runs the official fp16 arithmetic (the LLaVA-NeXT model's dtype)."""
    base, hi, block = next_layout(seed, 2, 144, 10, 13, dtype=torch.float16)
    ours = ours_next(gprune(0.5), base, hi, 10, 13)
    for i in range(2):
        assert ours[i].tolist() == official_gprune_next(block[i], 10, 13, 144).tolist()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ratio", [0.5, 0.111, 0.3])
def test_equals_upb_port_on_random_inputs(seed, ratio):
    """The port's InternVL hook on [tiles, tokens, C]: the first tile alone, the rest as one graph; 1 tile: one."""
    x = clustered(seed, 1, 5 * 16)[0]
    p = gprune(ratio, graphs="first_rest")
    grids = ((4, 4),) * 5
    ours = p(PruningInputs(tokens=x[None], grid=(1, 80), view_grids=grids)).indices[0]
    sel = torch.ones(90, dtype=torch.bool)
    sel[:5] = False
    _, kept, flat = upb_gprune_prune_pre_llm(sel, x.view(5, 16, -1).clone(), keep_ratio=ratio)
    assert ours.tolist() == flat.tolist() and torch.equal(x[ours], kept)
    one = p(PruningInputs(tokens=x[None, :16], grid=(4, 4))).indices[0]  # a single view: one graph
    _, kept, flat = upb_gprune_prune_pre_llm(sel.clone(), x[:16].view(1, 16, -1).clone(), keep_ratio=ratio)
    assert one.tolist() == flat.tolist()
    # scope clip, graphs auto: one graph over everything (the Qwen port's concatenated image tokens)
    allin = gprune(ratio, scope="clip")(PruningInputs(tokens=x[None], grid=(1, 80), view_grids=grids)).indices[0]
    assert allin.tolist() == upb_select_important_features(x.clone(), ratio, 0.5, 0.03, 5).sort().values.tolist()


# -- 3. the official pipelines on the tiny models --------------------------------------------------------------
def placed(lvlm, visuals, pruner, prompts=PROMPTS[:1]):
    """What the adapter + pruner place for one sample, every view (newlines too) in sequence order:
    ``(views, seq slots, tokens, position sources)``."""
    from tokenprune.adapters.pre_llm import prune_views

    enc = lvlm.encode(visuals, prompts, pruner.needs)
    kept = prune_views(enc.views, pruner, ["0"], lvlm.project_features)
    seq, tokens, sources = (torch.cat([k[i] for k in kept]) for i in range(3))
    order = seq.argsort()
    return enc.views, seq[order], tokens[order].float(), sources[order]


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_llava_next_places_the_official_two_graphs_and_every_newline(ratio):
    """G-Prune llava_arch.py L164-238 (``spatial_unpad`` + ``anyres``), then L239-290: the base view and the
    unpadded high-res rows with their newlines, one graph each, the newlines kept, original positions."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    lvlm = lvlm_for("llava_next")
    cfg = lvlm.model.config
    image = images(2)[1]  # 80 x 112: a 2x1 crop grid, unpadded rows
    batch = lvlm.prepare([image], PROMPTS[:1])
    inner = lvlm.model.model
    with torch.no_grad():
        hidden = inner.vision_tower(batch["pixel_values"][0], output_hidden_states=True).hidden_states
        image_feature = inner.multi_modal_projector(hidden[cfg.vision_feature_layer][:, 1:])
    size = batch["image_sizes"][0].tolist()
    # -- transcribed (HF's (height, width) conventions for the grid shape and unpad_image)
    base_image_feature = image_feature[0]
    image_feature = image_feature[1:]
    height = width = cfg.vision_config.image_size // cfg.vision_config.patch_size
    num_patch_height, num_patch_width = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints,
                                                                    cfg.vision_config.image_size)
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_feature = unpad_image(image_feature, size)
    row_num, col_num = image_feature.shape[1], image_feature.shape[2]
    image_feature = torch.cat((image_feature, inner.image_newline[:, None, None].expand(
        *image_feature.shape[:-1], 1)), dim=-1)
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    image_feature = torch.cat((base_image_feature, image_feature), dim=0)
    # --
    ref = official_gprune_next(image_feature, row_num, col_num, height * width, keep_ratio=ratio)
    views, seq, tokens, sources = placed(lvlm, [image], gprune(ratio))
    start = min(int(v.seq_index.min()) for v in views)
    assert row_num * col_num < (num_patch_height * height) * (num_patch_width * width)  # unpadding removed rows
    assert seq.tolist() == (start + ref).tolist()
    assert (tokens - image_feature[ref].float()).abs().max().item() <= 1e-5
    assert torch.equal(sources, seq)  # original positions: the official position_ids = keep_indices


def test_llava_places_one_official_graph():
    lvlm = lvlm_for("llava")
    cfg = lvlm.model.config
    batch = lvlm.prepare(images(1), PROMPTS[:1])
    with torch.no_grad():
        hidden = lvlm.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        feats = lvlm.model.model.multi_modal_projector(hidden[cfg.vision_feature_layer][:, 1:])[0]
    ref = upb_select_important_features(feats.clone(), 0.3, 0.5, 0.03, 5).sort().values  # int(.3 * 64) = 19
    views, seq, tokens, sources = placed(lvlm, images(1), gprune(0.3))
    assert seq.tolist() == views[0].seq_index[ref].tolist() and len(ref) == 19
    assert (tokens - feats[ref].float()).abs().max().item() <= 1e-5


def test_qwen2_5_vl_places_the_ports_rule():
    """custom_qwenvl.py: ``select_important_features`` on the merger outputs of the prompt's image tokens,
    ``keep_idx.sort()``, ``position_ids[:, :, keep_idx]`` (the original M-RoPE positions)."""
    lvlm = lvlm_for("qwen2_5_vl")
    image = images(2)[1]  # 5 x 7 merged tokens: int(35 * .3) = 10
    batch = lvlm.prepare([image], PROMPTS[:1])
    with torch.no_grad():
        image_embeds = torch.cat(lvlm.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
                                 .pooler_output, dim=0)
    img_idx = upb_select_important_features(image_embeds.clone(), 0.3, 0.5, 0.03, 5).sort().values
    views, seq, tokens, sources = placed(lvlm, [image], gprune(0.3))
    assert seq.tolist() == views[0].seq_index[img_idx].tolist() and len(img_idx) == 10
    assert (tokens - image_embeds[img_idx].float()).abs().max().item() <= 1e-5
    assert torch.equal(sources, seq)


def test_internvl_places_the_ports_first_tile_rest_split():
    """custom_internvl.py + GPrune_PreLLM.py: ``vit_embeds`` [tiles, 16, C] (tiles, then the thumbnail); the first
    tile alone, the rest one graph; the kept tokens in that order."""
    lvlm = lvlm_for("internvl")
    image = images(1)[0]
    batch = lvlm.prepare([image], PROMPTS[:1])
    cfg = lvlm.model.config
    with torch.no_grad():
        vit_embeds = lvlm.model.model.get_image_features(
            batch["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
    assert vit_embeds.shape[0] > 2  # several tiles and a thumbnail
    selected = (batch["input_ids"][0] == cfg.image_token_id).clone()
    _, kept, flat = upb_gprune_prune_pre_llm(selected, vit_embeds.clone(), keep_ratio=0.3)
    views, seq, tokens, sources = placed(lvlm, [image], gprune(0.3, graphs="first_rest"))
    start = int(batch["input_ids"][0].eq(cfg.image_token_id).nonzero().min())
    assert seq.tolist() == (start + flat).tolist()
    assert (tokens - kept.float()).abs().max().item() <= 1e-5


# -- 4. every family -------------------------------------------------------------------------------------------
IMAGE_FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision"]


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_images_on_every_family(family):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "gprune", new_tokens=4)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_one_graph_per_sample_at_scope_clip(family):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "gprune", new_tokens=4, scope="clip")


@pytest.fixture
def first_rest(monkeypatch):
    """``create_pruner("gprune", ...)`` with ``graphs="first_rest"`` (video_checks builds pruners by name); yields
    the pruners it made."""
    create, made = tp.create_pruner, []

    def patched(name, **kw):
        made.append(create(name, **({"graphs": "first_rest"} if name == "gprune" else {}), **kw))
        return made[-1]

    monkeypatch.setattr(tp, "create_pruner", patched)
    yield made


@pytest.mark.parametrize("family", ["internvl", "llava_next"])
def test_first_rest_graphs(family, first_rest):
    check_pruner_on(lvlm_for(family), images(2), PROMPTS, "gprune", new_tokens=4)
    assert first_rest and all(p.graphs == "first_rest" and p.scope == "clip" for p in first_rest)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videos_and_an_image_on_every_video_family(family):
    """A graph per frame (Qwen: per temporal patch), and one graph over the video at scope clip."""
    lvlm = lvlm_for(family)
    visuals, prompts = [video(), images(1)[0]], [PROMPTS[0], "describe the picture"]
    check_pruner_on(lvlm, visuals, prompts, "gprune", new_tokens=3)
    check_pruner_on(lvlm, [video(), video(seed=1)], PROMPTS, "gprune", new_tokens=3, scope="clip", ratio=0.5)


def test_original_positions_by_default():
    """Official: ``position_ids = keep_indices`` (LLaVA-NeXT) and ``position_ids[:, :, keep_idx]`` (Qwen port)."""
    p = gprune(0.25)
    assert p.default_position_policy(mrope=False) == "keep" == p.default_position_policy(mrope=True)
    lvlm = lvlm_for("llava")
    default = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2)
    keep = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2, position_policy="keep")
    compact = lvlm.generate(images(1), PROMPTS[:1], pruner=p, max_new_tokens=2, position_policy="compact")
    assert torch.equal(default.first_logits, keep.first_logits)
    assert not torch.allclose(default.first_logits, compact.first_logits)


# -- 5. contract, options, errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1, 0.01])
def test_contract(ratio):
    check_pruner_contract(gprune(ratio), synthetic_inputs(grid=(6, 8)))
    check_pruner_contract(gprune(ratio, rounding="round"), synthetic_inputs(grid=(5, 7), seed=3))
    check_pruner_contract(gprune(ratio, temperature=0.5, precision="float32"), synthetic_inputs(grid=(4, 6), seed=1))


def test_ratio_one_and_scores():
    inputs = PruningInputs(tokens=clustered(0, 2, 30), grid=(5, 6))
    full = gprune(1.0)(inputs)
    assert full.indices.tolist() == [list(range(30))] * 2
    red = gprune(0.5)(inputs)
    assert red.scores.shape == (2, 30) and red.indices.tolist() == tp.topk_indices(red.scores, 15).tolist()


@pytest.mark.parametrize("bad", [dict(rounding="ceil"), dict(similarity=1.5), dict(similarity="x"), dict(temperature=0),
                                 dict(temperature=-1), dict(iterations=-1), dict(iterations=2.5), dict(graphs="tiles"),
                                 dict(precision="fp8"), dict(ratio=0), dict(ratio=1.5)])
def test_bad_options_are_one_line(bad):
    with pytest.raises(OptionError) as err:
        tp.create_pruner("gprune", **bad)
    assert "\n" not in str(err.value)


def test_scopes_and_graphs():
    assert gprune().scope == "frame" and gprune(scope="clip").scope == "clip"
    assert gprune(graphs="first_rest").scope == "clip"
    with pytest.raises(OptionError, match="first_rest") as err:
        gprune(graphs="first_rest", scope="frame").scope
    assert "\n" not in str(err.value)
    with pytest.raises(OptionError, match="first_rest"):
        lvlm_for("internvl").generate(images(1), PROMPTS[:1], max_new_tokens=1,
                                      pruner=gprune(graphs="first_rest", scope="frame"))
