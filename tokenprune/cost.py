"""Analytical FLOPs of an LVLM run, from the Hugging Face config and the tokens each layer saw.

Convention: **1 multiply-add = 2 FLOPs** ("full" figures). Counted: every linear layer (GQA's
smaller K/V projections, the three matrices of gated MLPs), the attention matmuls (``QK^T`` and
``AV`` over the whole key length, as SDPA computes them), the vision patch embedding and the
projector, the LM head (only where logits are computed: the last prompt token and each decode
step) and decode steps, whose attention grows with the KV cache. Not counted: norms, softmax,
activations, rotary embeddings (elementwise, under 1% at these sizes). Qwen2.5-VL's windowed
vision blocks are counted over their windows.

The papers' convention (FastV Table 1) is kept beside it: per decoder layer
``4 n d^2 + 2 n^2 d + 2 n d m`` for ``n`` tokens, LLM prefill only, as the papers print it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

NON_GATED_MLP = {"gpt2", "opt", "gpt_neox", "phi", "bloom", "falcon"}


@dataclass(frozen=True)
class TextDims:
    """Shapes of a decoder that FLOPs depend on.

    Mixture-of-experts decoders (Qwen-style ``num_experts`` / ``moe_intermediate_size``): ``ffn`` is
    the width a token actually runs through (``num_experts_per_tok`` experts), ``router`` the
    router's outputs; both averaged over layers where some layers are dense (``mlp_only_layers``).
    """

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool
    router: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "TextDims":
        """From a text config (``LlamaConfig``, ``Qwen2Config``, ... or a multimodal one's ``text_config``)."""
        cfg = getattr(cfg, "text_config", None) or cfg
        heads = cfg.num_attention_heads
        ffn, router, n = cfg.intermediate_size, 0, cfg.num_hidden_layers
        experts = getattr(cfg, "num_experts", 0) or 0
        if experts and getattr(cfg, "moe_intermediate_size", None):
            dense = set(getattr(cfg, "mlp_only_layers", None) or [])
            step = getattr(cfg, "decoder_sparse_step", 1) or 1
            n_sparse = sum(1 for i in range(n) if i not in dense and (i + 1) % step == 0)
            active = cfg.num_experts_per_tok * cfg.moe_intermediate_size
            ffn = round((n_sparse * active + (n - n_sparse) * cfg.intermediate_size) / n)
            router = round(n_sparse * experts / n)
        return cls(
            hidden=cfg.hidden_size, ffn=ffn, layers=n, heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab=cfg.vocab_size, gated=getattr(cfg, "model_type", "") not in NON_GATED_MLP, router=router,
        )


def _layer_macs(d: TextDims, n_query: int, n_key: int) -> int:
    """Multiply-adds of one decoder layer for ``n_query`` new tokens attending to ``n_key`` keys."""
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    proj = n_query * d.hidden * (2 * q_width + 2 * kv_width)  # q, o and the (GQA-narrow) k, v
    attn = 2 * d.heads * d.head_dim * n_query * n_key  # QK^T and AV
    mlp = n_query * d.hidden * d.ffn * (3 if d.gated else 2)
    return proj + attn + mlp + n_query * d.hidden * d.router


def paper_layer_flops(n: int, hidden: int, ffn: int) -> float:
    """The papers' per-layer count ``4 n d^2 + 2 n^2 d + 2 n d m`` (FastV, Table 1)."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * ffn


def llm_flops(text_config: Any, tokens_per_layer: Sequence[int], convention: Literal["full", "paper"] = "full",
              new_tokens: int = 0) -> float:
    """FLOPs of the language model for one sample.

    Args:
        text_config: the decoder's config (or a multimodal config with ``text_config``).
        tokens_per_layer: prompt tokens each decoder layer processed at prefill (fewer after
            pruning; FastV shortens layers from K on).
        convention: ``"paper"`` -- ``sum_i 4 n_i d^2 + 2 n_i^2 d + 2 n_i d m``, prefill only;
            ``"full"`` -- 2 FLOPs per multiply-add, prefill + LM head + ``new_tokens - 1`` decode steps.
        new_tokens: tokens generated (the first comes from the prefill's logits).
    """
    d = TextDims.from_config(text_config)
    if len(tokens_per_layer) != d.layers:
        raise ValueError(f"{len(tokens_per_layer)} layer counts for a {d.layers}-layer decoder")
    if convention == "paper":
        return float(sum(paper_layer_flops(n, d.hidden, d.ffn) for n in tokens_per_layer))
    if convention != "full":
        raise ValueError(f"convention must be 'full' or 'paper', got {convention!r}")
    return 2.0 * (prefill_macs(d, tokens_per_layer) + decode_macs(d, tokens_per_layer, new_tokens)
                  + lm_head_macs(d, new_tokens))


def prefill_macs(d: TextDims, tokens_per_layer: Sequence[int]) -> int:
    """Multiply-adds of the prefill (causal attention computed over the whole prompt)."""
    return sum(_layer_macs(d, n, n) for n in tokens_per_layer)


def decode_macs(d: TextDims, tokens_per_layer: Sequence[int], new_tokens: int) -> int:
    """Multiply-adds of the ``new_tokens - 1`` cached decode steps; step ``t`` sees ``n + t + 1`` keys."""
    return sum(_layer_macs(d, 1, n + t + 1) for t in range(max(new_tokens - 1, 0)) for n in tokens_per_layer)


def lm_head_macs(d: TextDims, new_tokens: int) -> int:
    """The LM head runs once per generated token (prefill computes logits for the last token only)."""
    return max(new_tokens, 1) * d.hidden * d.vocab


@dataclass(frozen=True)
class VisionSpec:
    """Shapes of a vision tower and projector that FLOPs depend on.

    Attributes:
        width / mlp / gated / layers: the ViT's hidden size, MLP width, gated MLP?, depth.
        patch_in: input features of one patch (channels x patch area [x temporal patch]).
        projector: ``(in, out)`` of each projector matrix, applied once per visual token.
        windowed_layers: layers that attend within windows (Qwen2.5-VL), not the whole sequence.
        tokens_per_seq: if set, every encoder sequence (crop) embeds and projects this many tokens
            whether or not they reach the LLM (LLaVA-OneVision's unpadded, downsampled grid).
    """

    width: int
    mlp: int
    gated: bool
    layers: int
    patch_in: int
    projector: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    windowed_layers: int = 0
    tokens_per_seq: int = 0


def _pair(x: Any) -> int:
    return x[0] * x[1] if isinstance(x, (list, tuple)) else x * x


def vision_spec_from_config(config: Any) -> VisionSpec:
    """The :class:`VisionSpec` of a LLaVA / LLaVA-NeXT / Qwen2(.5)-VL / InternVL config."""
    vc = config.vision_config
    kind = config.model_type
    d = TextDims.from_config(config).hidden
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        merged = (vc.embed_dim if kind == "qwen2_vl" else vc.hidden_size) * vc.spatial_merge_size**2
        out = vc.hidden_size if kind == "qwen2_vl" else vc.out_hidden_size
        width = vc.embed_dim if kind == "qwen2_vl" else vc.hidden_size
        mlp = int(vc.embed_dim * vc.mlp_ratio) if kind == "qwen2_vl" else vc.intermediate_size
        windowed = vc.depth - len(vc.fullatt_block_indexes) if kind == "qwen2_5_vl" else 0
        return VisionSpec(width=width, mlp=mlp, gated=kind == "qwen2_5_vl", layers=vc.depth,
                          patch_in=vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
                          projector=((merged, merged), (merged, out)), windowed_layers=windowed)
    width = vc.hidden_size
    mlp = getattr(vc, "intermediate_size", None) or int(width * getattr(vc, "mlp_ratio", 4))
    channels = getattr(vc, "num_channels", 3)
    if kind == "internvl":
        merged = width * round(1 / config.downsample_ratio**2)
        projector = ((merged, d), (d, d))
    else:  # llava, llava_next: two-layer MLP from the selected feature layer(s)
        n_feat = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        projector = ((width * n_feat, d), (d, d))
    return VisionSpec(width=width, mlp=mlp, gated=False, layers=vc.num_hidden_layers,
                      patch_in=channels * _pair(vc.patch_size), projector=projector)


def vision_flops(spec: VisionSpec, encoder_seqs: Sequence[int], patches: int, visual_tokens: int,
                 windows: Sequence[int] = (), blocks: Sequence[Sequence[tuple[int, int]]] = ()) -> float:
    """FLOPs of the vision tower and projector for one sample.

    ``encoder_seqs``: length of each encoder sequence (one per image / tile / crop, prefix
    included); ``patches``: patches embedded; ``visual_tokens``: tokens the projector ran on;
    ``windows``: attention-window lengths of the windowed layers (Qwen2.5-VL); ``blocks``: for a
    tower an in-vision pruner cut, per sequence, the ``(attention, MLP)`` tokens of each block run --
    those sequences are counted block by block from what each block really saw (an empty entry:
    every layer saw the whole sequence).
    """
    if spec.tokens_per_seq:  # the projector ran on every crop token, not only on those the LLM got
        patches = visual_tokens = spec.tokens_per_seq * len(encoder_seqs)
    w = spec.width
    mlp_macs = w * spec.mlp * (3 if spec.gated else 2)  # per token
    cut = [bool(blocks[i]) if i < len(blocks) else False for i in range(len(encoder_seqs))]
    whole = [t for t, c in zip(encoder_seqs, cut) if not c]
    dense = sum(4 * t * w * w + t * mlp_macs for t in whole)
    full_attn = sum(2 * t * t * w for t in whole)
    window_attn = sum(2 * t * t * w for t in windows) if windows else full_attn
    attn = (spec.layers - spec.windowed_layers) * full_attn + spec.windowed_layers * window_attn
    # q, k, v and output projections plus QK^T and AV on the attention's tokens; the MLP on its own
    per_block = sum(4 * a * w * w + 2 * a * a * w + m * mlp_macs for i, c in enumerate(cut) if c for a, m in blocks[i])
    embed = patches * spec.patch_in * w
    projector = visual_tokens * sum(i * o for i, o in spec.projector)
    return 2.0 * (spec.layers * dense + attn + per_block + embed + projector)


@dataclass(frozen=True)
class SampleCost:
    """FLOPs of one sample, full convention except ``paper`` (see the module docstring)."""

    vision: float
    prefill: float
    decode: float
    lm_head: float
    paper: float

    @property
    def total(self) -> float:
        return self.vision + self.prefill + self.decode + self.lm_head


def _projected(stats: Any) -> int:
    """Tokens the projector ran on: all visual tokens, unless an in-vision pruner cut inside the tower."""
    projected = getattr(stats, "visual_tokens_projected", None)
    return stats.visual_tokens_in if projected is None else projected


def sample_cost(config: Any, vision: VisionSpec, stats: Any) -> SampleCost:
    """The :class:`SampleCost` of one :class:`~tokenprune.adapters.SampleStats`."""
    d = TextDims.from_config(config)
    tokens = stats.tokens_per_layer
    return SampleCost(
        vision=vision_flops(vision, stats.vision_seqs, stats.vision_patches, _projected(stats),
                            getattr(stats, "vision_windows", ()), getattr(stats, "vision_blocks", ())),
        prefill=2.0 * prefill_macs(d, tokens),
        # a decode plan that cut the KV cache after prefill (MustDrop): decoding attends to the cut caches
        decode=2.0 * decode_macs(d, getattr(stats, "cache_per_layer", None) or tokens, stats.new_tokens),
        lm_head=2.0 * lm_head_macs(d, stats.new_tokens),
        paper=llm_flops(config, tokens, convention="paper"),
    )
