"""InternVL video and multi-image: frames as single-tile views, several images per sample.

Checked against independent references: Hugging Face's forward and ``generate`` on the very
processor tensors, the image processor's pixels for a frame given as a one-tile image, the token
ids the processor wrote (``<img>``/``</img>`` around each frame), the processor's own tile counts
per image (``num_patches``), the tower's eager attention, and the shared pruner harness.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_adapters import BUILTIN, lvlm_for
from tokenprune.errors import OptionError
from tokenprune.media import Video
from tokenprune.pruner import PrunerNeeds
from video_checks import check_pruner_on, check_unpruned_matches_hf, hf_inputs

TILE = 32  # tiny_internvl's tile size: frames made at it need no resize
TOKENS = 16  # (32 / 4)^2 / 4 tokens per tile after pixel shuffle
PROMPTS = ["what is in the image ?", "how many dog are there ? answer using a single word"]
NEW = 4  # decoded tokens per pruner check: enough to compare, few enough for 20 checks in seconds


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def lvlm():
    return lvlm_for("internvl")


def video(frames: int = 4, size: tuple[int, int] = (TILE, TILE), seed: int = 1) -> Video:
    """A random clip sampled every 3rd frame of a 6 fps source (times 0.5, 1.0, ...)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    return Video.from_frames(pixels, fps=6.0, indices=[3 + 3 * i for i in range(frames)], total_frames=3 * frames + 3)


def images(seed: int = 2) -> list[Image.Image]:
    """Two images with different tile counts: 64x96 -> 2x2 tiles + thumbnail, 32x32 -> one tile."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in [(64, 96, 3), (TILE, TILE, 3)]]


def single(seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 48, 3), dtype=np.uint8))


# -- exactness against Hugging Face -------------------------------------------------------------
def test_unpruned_video_matches_hugging_face():
    check_unpruned_matches_hf(lvlm(), [video()], PROMPTS[:1])


@pytest.mark.parametrize("prompt", [PROMPTS[1], "compare <image> and <image> : what is in the image ?"])
def test_unpruned_multi_image_matches_hugging_face(prompt):
    check_unpruned_matches_hf(lvlm(), [images()], [prompt])


def test_unpruned_raw_video_prompt_matches_hugging_face():
    """``chat_template=False``: the prompt as given, ``<video>`` expanded to the frames by the processor."""
    lv, v, prompt = lvlm(), video(), "<video>\nwhat is in the image ?"
    out = lv.generate([v], [prompt], max_new_tokens=NEW, chat_template=False)
    batch = hf_inputs(lv.prepare([v], [prompt], chat_template=False))
    with torch.no_grad():
        ref_logits = lv.model(**batch).logits[:, -1]
        ref_tokens = lv.model.generate(**batch, max_new_tokens=NEW, do_sample=False)[0, batch["input_ids"].shape[1]:]
    assert (out.first_logits - ref_logits).abs().max().item() <= 1e-5
    n = out.stats[0].new_tokens
    assert out.token_ids[0, :n].tolist() == ref_tokens[:n].tolist()
    assert out.stats[0].visual_tokens_in == 4 * TOKENS and out.stats[0].vision_seqs == [1 + 64] * 4


def test_frames_are_the_image_processors_single_tiles():
    """Each frame's pixels == the image processor's for that frame given as an image (one tile, no thumbnail)."""
    lv, v = lvlm(), video()
    pixels = lv.prepare([v], PROMPTS[:1])["pixel_values"]
    assert pixels.shape == (4, 3, TILE, TILE)
    for i, frame in enumerate(v.frames):
        ref = lv.processor.image_processor(images=[Image.fromarray(frame)], return_tensors="pt")
        assert ref["num_patches"].tolist() == [1]
        torch.testing.assert_close(pixels[i], ref["pixel_values"][0], rtol=0, atol=2e-6)


def test_frames_are_resized_to_the_tile():
    """A frame of another size is resized to the tile: a flat grey frame stays that grey, hand-normalised."""
    lv = lvlm()
    v = Video.from_frames(np.full((2, 40, 56, 3), 100, dtype=np.uint8))
    pixels = lv.prepare([v], PROMPTS[:1])["pixel_values"]
    ip = lv.processor.image_processor
    expected = (100 / 255 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    assert pixels.shape == (2, 3, TILE, TILE)
    torch.testing.assert_close(pixels, expected.view(1, 3, 1, 1).expand_as(pixels).float(), rtol=0, atol=1e-6)


# -- views --------------------------------------------------------------------------------------
def test_video_views_are_frames():
    lv, v = lvlm(), video()
    batch = lv.prepare([v, single()], PROMPTS)
    ids = batch["input_ids"]
    tok = lv.processor.tokenizer.convert_tokens_to_ids
    views = lv.encode_images(batch, PrunerNeeds())
    frames = [w for w in views if w.sample == 0]
    assert [w.frame for w in frames] == [0, 1, 2, 3]
    assert [w.clip for w in frames] == [0] * 4 and all(w.image is None for w in frames)
    assert [w.time for w in frames] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # indices 3, 6, 9, 12 at 6 fps
    for w in frames:
        assert w.grid == (4, 4) and w.tokens.shape[0] == TOKENS and w.prunable
        s = w.seq_index
        assert torch.equal(s, torch.arange(s[0], s[0] + TOKENS))  # contiguous, one tile
        assert (ids[0, s] == tok("<IMG_CONTEXT>")).all()
        assert ids[0, s[0] - 1] == tok("<img>") and ids[0, s[-1] + 1] == tok("</img>")
    # Every context token of the sample is in exactly one frame view: Frame{i} text and markers in none.
    covered = torch.cat([w.seq_index for w in frames]).sort().values
    assert torch.equal(covered, (ids[0] == tok("<IMG_CONTEXT>")).nonzero().flatten())
    # The image sample keeps its image views.
    assert {(w.image, w.clip, w.frame, w.time) for w in views if w.sample == 1} == {(0, None, None, None)}


def test_multi_image_views_follow_the_processors_tiles():
    lv, ims = lvlm(), images()
    batch = lv.prepare([ims], PROMPTS[:1])
    views = lv.encode_images(batch, PrunerNeeds())
    tiles = [int(lv.processor.image_processor(images=[im], return_tensors="pt")["num_patches"][0]) for im in ims]
    assert tiles == [5, 1]
    assert [w.image for w in views] == [0] * 5 + [1]
    assert all(w.clip is None and w.frame is None for w in views)
    order = torch.cat([w.seq_index for w in views])
    assert torch.equal(order, order.sort().values)  # sequence order
    # The views' tokens are the HF model's image features, tile by tile.
    with torch.no_grad():
        ref = lv.model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    torch.testing.assert_close(torch.stack([w.tokens for w in views]), ref, rtol=0, atol=0)


def test_frame_is_encoded_exactly_as_a_single_tile_image():
    """A frame view's tokens and vision attention == those of the same frame given as an image."""
    lv, v = lvlm(), video()
    needs = PrunerNeeds(vision_attention_layer=-1, vision_attention_rows="all")
    batch = lv.prepare([v], PROMPTS[:1])
    frames = lv.encode_images(batch, needs)
    eager = lv.reference_vision_attention(batch, -1)  # the tower's own output_attentions, per tile
    for i, w in enumerate(frames):
        alone = lv.encode_images(lv.prepare([Image.fromarray(v.frames[i])], PROMPTS[:1]), needs)
        assert len(alone) == 1
        torch.testing.assert_close(w.tokens, alone[0].tokens, rtol=0, atol=2e-5)
        torch.testing.assert_close(w.vision_attention, alone[0].vision_attention, rtol=0, atol=2e-5)
        torch.testing.assert_close(w.vision_attention, eager[i], rtol=0, atol=1e-5)


def test_video_options_refused():
    lv = lvlm()
    with pytest.raises(OptionError, match="one frame count"):
        lv.prepare([video(4), video(2)], PROMPTS)
    with pytest.raises(OptionError, match="does not sample"):
        lv.video_processor()([video().frames], do_sample_frames=True)


def test_hf_inputs_drop_the_frame_times():
    batch = lvlm().prepare([video(), single()], PROMPTS)
    assert batch["tp_video_times"].tolist() == [pytest.approx([0.5, 1.0, 1.5, 2.0])]
    assert batch["tp_video_samples"].tolist() == [0]  # the video is batch row 0, the image row 1
    assert not any(k.startswith("tp_") for k in hf_inputs(batch))


# -- every built-in pruner ----------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_pruner_on_video(name):
    check_pruner_on(lvlm(), [video(), single()], PROMPTS, name, new_tokens=NEW)


@pytest.mark.parametrize("name", BUILTIN)
def test_pruner_on_multi_image(name):
    check_pruner_on(lvlm(), [images(), video()], PROMPTS, name, new_tokens=NEW)
