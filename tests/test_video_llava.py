"""Video on LLaVA-OneVision and LLaVA-NeXT-Video, OneVision multi-image prompts, and the frames preprocessor.

What is checked, against independent references:
1. the frames preprocessor (``tokenprune.media.processors.frames``) == the family's PIL image processor on a
   frame that needs no resize (to float rounding); resized frames within one grey level of PIL's bicubic;
   shortest-edge + centre-crop offsets and a constant frame by hand;
2. the video views: one per frame (grid, frame, time = source index / fps, clip, image) plus OneVision's
   one trailing newline (``prunable=False``), covering the video tokens once, in order; their tokens
   placed at ``seq_index`` == the model's own ``get_video_features``;
3. per-frame vision attention == the tower's eager ``output_attentions`` map pooled with the pooling
   matrix written from its formula (OneVision: bilinear ``P A P^T``; NeXT-Video: 2x2 means), features and
   keys likewise (keys captured by a hook on the layer's ``k_proj``);
4. unpruned logits == Hugging Face forward and tokens == HF ``generate`` (video; OneVision multi-image;
   NeXT-Video's image path);
5. every built-in pruner on a batch (video, image) -- OneVision (video, two images, image): ratio 1.0 ==
   unpruned, tokens entering each decoder layer == text + budget (pre-hooks), cached == uncached, batch ==
   each sample alone (``tests/video_checks.py``);
6. one-line errors: NeXT-Video with max pooling asked for vision attention; videos of unequal length.

The tiny models run single-threaded here: their matrices are so small that thread hand-offs cost more
than the work (x20 on a loaded 2-core machine).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters import adapter_for, wrap
from tokenprune.adapters.common import attention_modules, eager_vision_attention
from tokenprune.adapters.llava_onevision import _bilinear_matrix
from tokenprune.media import Video
from tokenprune.media.processors.frames import FramesProcessor
from tokenprune.pruner import PrunerNeeds
from tokenprune.zoo.tiny_llava_next_video import tiny_llava_next_video
from tokenprune.zoo.tiny_llava_onevision import tiny_llava_onevision
from video_checks import BUILTIN_PRUNERS, check_counts, check_pruner_on, check_unpruned_matches_hf, hf_inputs

FAMILIES = ["llava_onevision", "llava_next_video"]
PIXELS = {"llava_onevision": 40, "llava_next_video": 32}  # each tower's image_size: frames need no resize
FRAMES = 4
FPS = 2.0
INDICES = (0, 3, 6, 9)  # source frames sampled: times 0, 1.5, 3, 4.5 s
PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word", "describe the picture"]
NEW_TOKENS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@functools.lru_cache(maxsize=None)
def lvlm_for(family: str):
    build = {"llava_onevision": tiny_llava_onevision, "llava_next_video": tiny_llava_next_video}[family]
    return wrap(*build())


def clip(size: int | tuple[int, int], seed: int = 0, frames: int = FRAMES) -> Video:
    """A random video of ``frames`` frames (``size`` px, or ``(h, w)``), sampled at ``INDICES`` of a 2 fps source."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return Video.from_frames(rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8), fps=FPS,
                             indices=INDICES[:frames], total_frames=12)


def picture(h: int, w: int, seed: int = 1) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def placed(batch, views, token_id: int) -> torch.Tensor:
    """Every view's tokens written at its ``seq_index``, read back at the ``token_id`` positions (row-major,
    as HF's ``masked_scatter`` fills them): ``[tokens, D]``."""
    ids = batch["input_ids"]
    seq = torch.full((*ids.shape, views[0].tokens.shape[-1]), float("nan"))
    for v in views:
        seq[v.sample, v.seq_index] = v.tokens.float()
    return seq[ids == token_id]


def hf_video_features(lvlm, batch) -> torch.Tensor:
    cfg = lvlm.model.config
    with torch.no_grad():
        out = lvlm.model.model.get_video_features(
            pixel_values_videos=batch["pixel_values_videos"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
    return out.pooler_output.flatten(0, 1).float()


def pooling_by_formula(family: str, s: int) -> torch.Tensor:
    """``[m, s^2]``: OneVision's bilinear ``s -> ceil(s/2)`` from the interpolation formula; NeXT-Video's 2x2 means."""
    if family == "llava_onevision":
        return torch.kron(_bilinear_matrix(s, -(-s // 2)), _bilinear_matrix(s, -(-s // 2)))
    half = torch.zeros(s // 2, s)
    for i in range(s // 2):
        half[i, 2 * i] = half[i, 2 * i + 1] = 0.5
    return torch.kron(half, half)


# -- 1. the frames preprocessor --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_frames_equal_the_image_processor_without_resize(family):
    lvlm = lvlm_for(family)
    px = PIXELS[family]
    frame = clip(px).frames[:1]
    ip = lvlm.processor.image_processor
    ref = ip(images=[Image.fromarray(frame[0])], return_tensors="pt")["pixel_values"][0, 0]  # the base view
    ours = lvlm.video_processor()([frame])["pixel_values_videos"]
    assert ours.shape == (1, 1, 3, px, px) and ours.dtype == torch.float32
    assert (ours[0, 0] - ref).abs().max().item() <= 1e-6


def test_resized_frames_within_one_grey_level_of_pil():
    ip = lvlm_for("llava_onevision").processor.image_processor
    frame = np.random.default_rng(3).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    ref = ip(images=[Image.fromarray(frame)], return_tensors="pt")["pixel_values"][0, 0]  # PIL bicubic to 40x40
    ours = FramesProcessor.from_image_processor(ip)([frame[None]])["pixel_values_videos"][0, 0]
    grey = (ours - ref) * torch.tensor(ip.image_std).view(3, 1, 1) * 255
    assert grey.abs().max().item() <= 1 + 1e-3 and grey.abs().mean().item() < 0.3


def test_shortest_edge_crop_and_constant_frames_by_hand():
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    fp = FramesProcessor({"shortest_edge": 32}, mean, std, crop_size={"height": 32, "width": 32}, do_center_crop=True)
    frame = np.random.default_rng(4).integers(0, 255, (2, 32, 40, 3), dtype=np.uint8)  # shortest edge already 32
    expected = ((frame[:, :, 4:36] / 255 - mean) / std).transpose(0, 3, 1, 2)  # left offset (40 - 32) // 2
    got = fp([frame])["pixel_values_videos"][0]
    assert np.abs(got.numpy() - expected).max() <= 1e-5
    # a constant frame stays constant through bicubic resizing: 48x64 -> shortest edge 32 -> 32x42 -> crop 32x32
    flat = np.full((3, 48, 64, 3), 200, dtype=np.uint8)
    got = fp(flat)["pixel_values_videos"]
    assert got.shape == (1, 3, 3, 32, 32)
    assert np.abs(got[0].numpy() - ((200 / 255 - mean) / std)[None, :, None, None]).max() <= 1e-5
    with pytest.raises(tp.OptionError, match="does not sample"):
        fp([frame], do_sample_frames=True)


def test_a_frame_size_other_than_the_towers_is_resized_in_the_processor():
    lvlm = lvlm_for("llava_next_video")
    batch = lvlm.prepare([clip((48, 64))], PROMPTS[:1])
    assert tuple(batch["pixel_values_videos"].shape) == (1, FRAMES, 3, 32, 32)
    assert int((batch["input_ids"] == lvlm.model.config.video_token_id).sum()) == FRAMES * 16


# -- 2. and 3. views, tokens, attention, features, keys -----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_video_views_layout_and_tokens_equal_get_video_features(family):
    lvlm = lvlm_for(family)
    cfg = lvlm.model.config
    batch = lvlm.prepare([picture(40, 40), clip(PIXELS[family])], PROMPTS[:2])  # the video is sample 1
    views = lvlm.encode_images(batch, PrunerNeeds())
    video = [v for v in views if v.image is None]
    # OneVision: 5x5 tokens pooled bilinearly to ceil(5/2) = 3x3, one newline after all frames (4*9 + 1 = 37);
    # NeXT-Video: 8x8 patches, 2x2 average -> 4x4, no newline (4 * 16 = 64)
    side, newline = (3, 1) if family == "llava_onevision" else (4, 0)
    assert [(v.sample, v.grid, v.frame, v.clip, v.prunable) for v in video] == \
        [(1, (side, side), f, 0, True) for f in range(FRAMES)] + [(1, (1, 1), None, 0, False)] * newline
    assert [v.time for v in video[:FRAMES]] == [0.0, 1.5, 3.0, 4.5]  # INDICES / FPS
    positions = (batch["input_ids"][1] == cfg.video_token_id).nonzero().flatten()
    assert len(positions) == FRAMES * side * side + newline
    assert torch.equal(torch.cat([v.seq_index for v in video]), positions)  # every video token once, in order
    assert all(v.sample == 0 and v.image == 0 and v.clip is None for v in views if v.image is not None)
    assert sum(v.image is not None for v in views) == 3  # 40x40: base, high-res, newlines
    assert [v.sample for v in views] == sorted(v.sample for v in views)
    got = placed(batch, video, cfg.video_token_id)
    assert (got - hf_video_features(lvlm, hf_inputs(batch))).abs().max().item() <= 1e-6
    if newline:
        assert torch.equal(video[-1].tokens[0], lvlm.model.model.image_newline)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_attention_features_and_keys_follow_the_pooling(family):
    lvlm = lvlm_for(family)
    cfg = lvlm.model.config
    batch = lvlm.prepare([clip(PIXELS[family])], PROMPTS[:1])
    views = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2, vision_features=True, vision_keys=True))
    frames = [v for v in views if v.prunable]
    tower = lvlm.model.model.vision_tower
    pixels = batch["pixel_values_videos"][0]  # [T, 3, px, px]
    keys = []
    handle = attention_modules(tower)[-2].k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    try:
        with torch.no_grad():
            hidden = tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    finally:
        handle.remove()
    heads = cfg.vision_config.num_attention_heads
    k = keys[0].view(*keys[0].shape[:2], heads, -1).mean(2)  # [T, S, d] head-averaged
    att = eager_vision_attention(tower, pixels, -2)  # [T, S, S]
    s = cfg.vision_config.image_size // cfg.vision_config.patch_size
    p = pooling_by_formula(family, s)
    prefix = 1 if cfg.vision_feature_select_strategy == "default" else 0
    assert prefix == (family == "llava_next_video")  # NeXT-Video's CLIP drops its CLS; SigLIP has none
    for f, v in enumerate(frames):
        a = att[f]
        expected = p @ a[prefix:, prefix:] @ p.T
        if prefix:
            top = torch.cat([a[:1, :1], a[:1, 1:] @ p.T], 1)
            expected = torch.cat([top, torch.cat([p @ a[1:, :1], expected], 1)], 0)
        assert v.vision_attention.shape == expected.shape == (prefix + p.shape[0],) * 2
        assert (v.vision_attention - expected).abs().max().item() <= 1e-6
        assert (v.vision_features - p @ hidden[f, prefix:]).abs().max().item() <= 1e-5
        assert (v.vision_keys - torch.cat([k[f, :prefix], p @ k[f, prefix:]])).abs().max().item() <= 1e-5
        if prefix:
            assert torch.equal(v.vision_prefix_features, hidden[f, :prefix])
    if family == "llava_next_video":  # pooled before the projector: projecting the features gives the tokens
        for v in frames:
            assert (lvlm.project_features(v.vision_features) - v.tokens).abs().max().item() <= 1e-5


# -- 4. against Hugging Face ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_video_matches_hugging_face(family):
    lvlm = lvlm_for(family)
    check_unpruned_matches_hf(lvlm, [clip(PIXELS[family], seed=5)], PROMPTS[1:2])


def test_onevision_multi_image_matches_hugging_face_and_model_layout():
    lvlm = lvlm_for("llava_onevision")
    cfg = lvlm.model.config
    two, prompt = [picture(40, 56, 2), picture(64, 40, 3)], "compare <image> and <image> : what is in the image ?"
    check_unpruned_matches_hf(lvlm, [two, two], [prompt, PROMPTS[0]])  # placed in the prompt, and first
    batch = lvlm.prepare([picture(48, 48, 4), two], PROMPTS[:2])  # a lone image (anyres), then two images
    assert batch["batch_num_images"].tolist() == [1, 2]
    views = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2))
    # the lone 48x48 image: base 5x5 + 2x2 crops stitched 10x10, r = sqrt(100/75) > 1.1 -> 8x8, 8 newlines;
    # each image of the pair: its base crop 5x5 + one newline (get_image_features: no anyres)
    assert [(v.sample, v.image, v.grid, v.prunable) for v in views] == [
        (0, 0, (5, 5), True), (0, 0, (8, 8), True), (0, 0, (8, 1), False),
        (1, 0, (5, 5), True), (1, 0, (1, 1), False), (1, 1, (5, 5), True), (1, 1, (1, 1), False)]
    with torch.no_grad():
        packed = lvlm.model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                     batch_num_images=batch["batch_num_images"], return_dict=True)
    assert (placed(batch, views, cfg.image_token_id) - torch.cat(packed.pooler_output)).abs().max().item() <= 1e-6
    ref = lvlm.reference_vision_attention(batch, -2)  # eager maps, per prunable view in processor order
    prunable = [v for v in views if v.prunable]
    assert len(ref) == len(prunable)
    assert all((v.vision_attention - r).abs().max().item() <= 1e-6 for v, r in zip(prunable, ref))


def test_next_video_image_path_matches_hugging_face():
    lvlm = lvlm_for("llava_next_video")
    check_unpruned_matches_hf(lvlm, [picture(32, 32)], PROMPTS[:1])  # 1x2 crops unpadded to 8x8: 64 + 64 + 8
    batch = lvlm.prepare([picture(32, 32)], PROMPTS[:1])
    views = lvlm.encode_images(batch, PrunerNeeds(vision_attention_layer=-2))
    assert [(v.grid, v.prunable, v.image) for v in views] == [((8, 8), True, 0), ((8, 8), True, 0), ((8, 1), False, 0)]
    ref = lvlm.reference_vision_attention(batch, -2)
    assert all((v.vision_attention - r).abs().max().item() <= 1e-6 for v, r in zip(views[:2], ref))


# -- 5. every pruner ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN_PRUNERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pruner_on_video_and_images(family, name):
    lvlm = lvlm_for(family)
    video = clip(PIXELS[family], seed=6)
    if family == "llava_onevision":  # video, a multi-image sample, a lone image
        visuals = [video, [picture(40, 40, 7), picture(40, 56, 8)], picture(40, 40, 9)]
        check_counts(lvlm, visuals[1], PROMPTS[1], name)
    else:
        visuals = [video, picture(32, 32, 7)]
    check_pruner_on(lvlm, visuals, PROMPTS[:len(visuals)], name, new_tokens=NEW_TOKENS)


# -- 6. family plumbing and errors ---------------------------------------------------------------------------
def test_next_video_is_registered_and_loads_from_the_zoo():
    assert adapter_for("llava_next_video").family == "llava_next_video"
    assert type(tp.load("tiny-llava-next-video")).family == "llava_next_video"


def test_max_pooling_refuses_vision_attention_in_one_line_but_runs_unpruned():
    lvlm = wrap(*tiny_llava_next_video(pool_mode="max", vision=dict(num_hidden_layers=1),
                                       text=dict(num_hidden_layers=1)))
    video = clip(32)
    check_unpruned_matches_hf(lvlm, [video], PROMPTS[:1], new_tokens=2)
    with pytest.raises(tp.OptionError) as err:
        lvlm.generate([video], PROMPTS[:1], pruner=tp.create_pruner("fopru_rank", ratio=0.5), max_new_tokens=1)
    assert "\n" not in str(err.value) and "spatial_pool_mode='max'" in str(err.value)
    out = lvlm.generate([video], PROMPTS[:1], pruner=tp.create_pruner("divprune", ratio=0.5), max_new_tokens=1)
    assert out.stats[0].visual_tokens_kept == FRAMES * 8


def test_videos_of_unequal_length_in_one_batch_are_refused_in_one_line():
    lvlm = lvlm_for("llava_onevision")
    with pytest.raises(tp.OptionError) as err:
        lvlm.prepare([clip(40), clip(40, frames=3)], PROMPTS[:2])
    assert "\n" not in str(err.value) and "frames" in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["tome", "flowcut"])
def test_in_vision_pruner_on_video_is_refused_in_one_line(family, name):
    """The video paths pool each frame's whole grid: a cut inside the tower cannot be honoured, and running
    the frames uncut would report the unpruned model under the method's name (tome once did: 144 of 144 kept)."""
    lvlm = lvlm_for(family)
    with pytest.raises(tp.OptionError) as err:
        lvlm.generate([clip(PIXELS[family])], PROMPTS[:1], pruner=tp.create_pruner(name, ratio=0.25), max_new_tokens=1)
    assert "\n" not in str(err.value) and "do not run on videos" in str(err.value)
