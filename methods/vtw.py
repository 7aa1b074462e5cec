"""VTW (arXiv 2405.05803, Lin et al.): withdraw every visual token from the LLM at layer K.

As the official code ``lzhxmu/VTW@a3d8cfc`` (``llava/model/language_model/VTW.py``,
``VTWLlamaModel.forward`` L234-345, ``temp_cache``): at the input of decoder layer ``K`` (0-based,
``decoder_layer.self_attn.layer_idx == k``), in prefill only, **all** image tokens leave the sequence
(``cat(h[:, :sys], h[:, sys + img:])``): layers ``< K`` see and cache them, layers ``>= K`` never do, and
generated tokens see them only in layers ``< K``. With the default ``pe_type="keep"`` the position ids are
sliced the same way, so the text keeps its **original positions** and decoding continues from the full
length (``position_policy = "keep"``).

**K** is found per model by ``tokenprune calibrate vtw --model M --task T`` (the official ``--findk``,
``lmms_eval/__main__.py`` L386-400, see :mod:`tokenprune.calibrate`): withdrawing at each layer from 5 on,
K is the first whose mean KL divergence of the last prompt token's next-token distribution (withdrawn vs
full, over ``--limit 20`` samples) is at most ``eta`` (0.003). The K found is stored per model under the
tokenprune cache dir; ``vtw`` with no ``k`` uses it.

Options:

| option | official default | what it does |
| --- | --- | --- |
| ``k`` (``None``) | ``--k 16`` (lmms-eval CLI; README example 15) | the 0-based layer that first runs without the visual tokens, in ``1..L-1``; ``None``: the K calibrated for this model (stored by ``tokenprune calibrate vtw``); ``"ratio"``: ``K = round(ratio * L)`` (half up), the layer-averaged budget below |
| ``model`` (``None``) | -- | look the calibrated K up under this model id (as given to ``calibrate --model``) instead of by the running model's fingerprint |
| ``ratio`` (0.5) | -- | only with ``k="ratio"``; otherwise ignored (``uses_ratio`` false: a sweep runs ``vtw`` once) |

**Budget.** VTW has none: ``num_kept`` is 0 (every visual token goes at K). Its layer-averaged equivalent
is ``N * K / L`` visual tokens (576 x 16 / 32 = 288 for LLaVA-1.5-7B at K = 16), i.e. a share ``K / L``;
``k="ratio"`` inverts that (``K = round(ratio * L)``, clamped to ``1..L-1``) for sweeps at matched
layer-averaged budgets (not the official K).

**Deliberate differences.** (1) The visual tokens are found, not hard-coded (official: 35 system tokens and
576 image tokens, ``temp_cache.system_token_nums`` / ``image_token_nums`` set per sample in ``llava_arch``
L261-262; a multi-image prompt there withdraws only a span the size of the *last* image starting after the
first text chunk). (2) On LLaVA-NeXT the official span also holds the row newline tokens (``image_features``
includes them); tokenprune's in-LLM pruners see only the visual tokens, so the newlines (one per row of the
high-res grid) stay. (3) Batched (official: batch 1, no attention mask slicing, which works only because
SDPA with one sample needs none); padding is handled by the decoder. (4) ``mode="random"`` (576 random
tokens of any type) and ``pe_type`` other than ``"keep"`` are not ported (``position_policy="compact"``
renumbers instead).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import OptionError
from ..pruner import LLMStage, PrunerNeeds, PruningInputs, Reduction, Stage, TokenPruner, register_pruner, validate_int, validate_ratio

K_RATIO = "ratio"


@register_pruner("vtw")
class VTWPruner(TokenPruner):
    """VTW: every visual token withdrawn from the LLM at layer K (K calibrated per model by tokenprune calibrate vtw)."""

    stage = Stage.IN_LLM
    quantised = True  # keeps 0, not keep_count(ratio, N)
    position_policy = "keep"

    def __init__(self, ratio: float = 0.5, k: int | str | None = None, model: str | None = None):
        self.ratio = validate_ratio(ratio)
        if k is None or k == K_RATIO:
            self.k = k
        elif isinstance(k, str):
            raise OptionError(f"k must be a layer index >= 1, 'ratio', or unset (the K calibrated for the model); got {k!r}")
        else:
            self.k = validate_int(k, "k", minimum=1)
        if model is not None and not isinstance(model, str):
            raise OptionError(f"model must be a model id (as given to tokenprune calibrate vtw --model), got {model!r}")
        self.model = model
        # The running decoder's fingerprint, set by bind_decoder (the decoder calls it before asking the schedule).
        self._fingerprint: str | None = None
        self._bound: int | None = None

    # -- K ------------------------------------------------------------------------------------------
    def bind_decoder(self, text_model: nn.Module) -> None:
        """Remember which decoder runs this pruner, so ``k=None`` finds the K calibrated for it."""
        if self.k is None and self.model is None and self._bound != id(text_model):
            from ..calibrate import model_fingerprint

            self._fingerprint, self._bound = model_fingerprint(text_model), id(text_model)

    def withdraw_layer(self, n_layers: int) -> int:
        """K on a decoder of ``n_layers`` layers (0: unknown, outside a model).

        Raises:
            OptionError: ``k`` out of ``1..n_layers - 1``, or no K given and none calibrated for the model.
        """
        if self.k == K_RATIO:
            depth = n_layers or 32  # outside a model: LLaVA-1.5-7B's depth
            return min(max(1, math.floor(self.ratio * depth + 0.5)), depth - 1)
        if self.k is not None:
            k = self.k
        else:
            from ..calibrate import stored_k

            k = stored_k(model=self.model, fingerprint=self._fingerprint)
            if k is None:
                which = f"model {self.model!r}" if self.model is not None else "this model"
                raise OptionError(f"vtw has no withdrawal layer K for {which}: run `tokenprune calibrate vtw --model M "
                                  "--task T` first (it stores K for that model), or give one, e.g. vtw:k=16")
        if n_layers and not 1 <= k < n_layers:
            raise OptionError(f"vtw: k={k} but this decoder has {n_layers} layers (0..{n_layers - 1}): K must be in "
                              f"1..{n_layers - 1} (the layer that first runs without the visual tokens)")
        return k

    def llm_schedule(self, n_layers: int) -> tuple[LLMStage, ...]:
        """One stage at layer K that keeps nothing; ``ratio=1`` with ``k="ratio"``: no stage (every layer sees all)."""
        if self.k == K_RATIO and self.ratio >= 1.0:
            return ()
        return (LLMStage(layer=self.withdraw_layer(n_layers)),)

    @property
    def needs(self) -> PrunerNeeds:
        """Hidden states only; the layer is resolved against the decoder (:meth:`llm_schedule`)."""
        if self.k is None:  # K is the model's: unknown until the decoder binds
            return PrunerNeeds()
        return PrunerNeeds(llm_stages=self.llm_schedule(0))

    @property
    def uses_ratio(self) -> bool:
        """Only ``k="ratio"`` reads ``ratio``."""
        return self.k == K_RATIO

    def num_kept(self, n_tokens: int, grid: tuple[int, int]) -> int:
        return n_tokens if (self.k == K_RATIO and self.ratio >= 1.0) else 0

    def stage_counts(self, n_tokens: int, n_layers: int = 0) -> list[int]:
        return [self.num_kept(n_tokens, (1, n_tokens))]

    def layer_average_share(self, n_layers: int) -> float:
        """The share of visual tokens the layers see on average: ``K / L``."""
        if not self.llm_schedule(n_layers):
            return 1.0
        return self.withdraw_layer(n_layers) / n_layers

    def select(self, inputs: PruningInputs) -> Reduction:
        """Withdraw every visual token: ``[B, 0]`` indices (``[B, N]``, all, with ``k="ratio"`` at ratio 1)."""
        b, n = inputs.batch_size, inputs.num_tokens
        keep = self.num_kept(n, inputs.grid)
        indices = torch.arange(keep, device=inputs.tokens.device).expand(b, -1)
        return Reduction(indices=indices)
