"""``tokenprune calibrate vtw`` (tokenprune/calibrate.py): the official K search of lzhxmu/VTW@a3d8cfc transcribed
(``VTW.py`` ``VTWLlamaModel.forward`` findk branch L234-265, ``VTWLlamaForCausalLM.forward`` L102-107,
``lmms_eval/__main__.py`` L386-400) and compared on the tiny LLaVA; hand-computed KL and thresholds; the store;
the command end to end, then ``vtw`` with no ``k`` withdrawing at the stored K (counts by forward pre-hooks).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokenprune as tp
import tokenprune.methods.vtw  # noqa: F401  registers "vtw"
from tokenprune import calibrate as cal
from tokenprune.adapters.decoder import DecoderRunner

from test_adapters import PROMPTS, LayerInputCounter, images, lvlm_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def bind_hook(monkeypatch):
    """The decoder's ``bind_decoder`` call (/work/notes/vtw_decoder.diff) until it lands in decoder.py."""
    if "bind_decoder" in inspect.getsource(DecoderRunner.schedule):
        return
    original = DecoderRunner.schedule

    def schedule(self, pruner):
        bind = getattr(pruner, "bind_decoder", None)
        if bind is not None:
            bind(self.model)
        return original(self, pruner)

    monkeypatch.setattr(DecoderRunner, "schedule", schedule)


def cli(*argv: str) -> int:
    """``tokenprune calibrate ...`` through the parser hook the CLI adds (/work/notes/calibrate_cli.diff)."""
    parser = argparse.ArgumentParser(prog="tokenprune")
    cal.add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


# -- hand-computed ---------------------------------------------------------------------------------
def test_hand_computed_kl_direction_and_threshold():
    full = torch.tensor([[0.0, 0.0]])  # p = (.5, .5)
    withdrawn = torch.tensor([[math.log(3.0), 0.0]])  # q = (.75, .25)
    # KL(withdrawn || full) = .75 ln(.75/.5) + .25 ln(.25/.5) = 0.130812; the other direction would be 0.143841
    assert cal.kl_withdrawn_vs_full(full, withdrawn).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert cal.kl_withdrawn_vs_full(full, withdrawn).item() == pytest.approx(0.130812, abs=1e-6)
    assert cal.kl_withdrawn_vs_full(full, full).item() == 0
    assert cal.first_below([0.5, 0.01, 0.002, 0.004, 0.001], 0.003) == 7  # 5 + index 2: the first, not the least
    assert cal.first_below([0.5, 0.01], 0.003) is None
    assert cal.first_below([0.5, 0.003], 0.003, start=1) == 2  # <= eta
    assert cal.official_eta("liuhaotian/llava-v1.5-13b") == 0.0005
    assert cal.official_eta("liuhaotian/llava-v1.5-7b") == 0.003
    assert cal.official_eta("liuhaotian/llava-v1.6-vicuna-7b") == 0.0001
    assert cal.official_eta("tokenprune-demo") == 0.003


def official_kl_list(logits, logits_list):
    """VTW.py ``VTWLlamaForCausalLM.forward`` L104-107, per sample (batch 1)."""
    KL_div = nn.KLDivLoss(reduction='batchmean')
    return [KL_div(F.log_softmax(logits[:, -1], dim=1), F.softmax(logits_list[i], dim=1)).item() for i in range(len(logits_list))]


def official_k(KL_di_total, eta, start=5):
    """lmms_eval/__main__.py L398-400 (``first_index.item() + 5``, the 5 being the search's first layer)."""
    kl_results = torch.tensor(KL_di_total).mean(dim=0)
    first_index = (kl_results <= eta).nonzero()[0]
    return first_index.item() + start


@pytest.mark.parametrize("seed", range(3))
def test_kl_and_k_equal_the_official_formulas_on_random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    samples = [(torch.randn(1, 3, 50, generator=g), [torch.randn(1, 50, generator=g) * s for s in (2, 1, .3, .1, .05, .01)])
               for _ in range(4)]
    ours = torch.stack([torch.cat([cal.kl_withdrawn_vs_full(full[:, -1], w) for w in ws]) for full, ws in samples])
    ref = [official_kl_list(full, ws) for full, ws in samples]
    torch.testing.assert_close(ours, torch.tensor(ref), rtol=1e-5, atol=1e-7)
    mean = ours.mean(0).tolist()
    for eta in sorted(mean)[1:]:
        assert cal.first_below(mean, eta) == official_k(ref, eta)


# -- the official findk prefill, transcribed --------------------------------------------------------------
def official_findk_last_embeddings(text_model, inputs_embeds, system_token_nums, image_token_nums, start):
    """VTW.py ``VTWLlamaModel.forward`` L234-262 (``seq_length > 1 and temp_cache.findk``), batch 1, with the
    hard-coded 35 / 611 (LLaVA-1.5's span) as the sample's own span and the first layer ``start`` (official 5).
    The official mask is SDPA's ``None`` (causal); an explicit causal mask of the current length stands for it."""
    original_hidden_states = inputs_embeds
    ori_position_ids = torch.arange(inputs_embeds.shape[1])[None]
    seq_length = inputs_embeds.shape[1]
    last_embedding_list = []
    for drop_layer_idx in range(start, len(text_model.layers), 1):
        hidden_states = original_hidden_states
        position_ids = ori_position_ids
        for decoder_layer in text_model.layers:
            if decoder_layer.self_attn.layer_idx == drop_layer_idx and seq_length > 1:
                hidden_states = torch.cat([hidden_states[:, :system_token_nums],
                                           hidden_states[:, system_token_nums + image_token_nums:]], dim=1)
                position_ids = torch.cat([position_ids[:, :system_token_nums],
                                          position_ids[:, system_token_nums + image_token_nums:]], dim=1)
            n = hidden_states.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            hidden_states = decoder_layer(hidden_states, attention_mask=causal, position_ids=position_ids,
                                          position_embeddings=text_model.rotary_emb(hidden_states, position_ids))
            if isinstance(hidden_states, tuple):
                hidden_states = hidden_states[0]
        hidden_states = text_model.norm(hidden_states)
        last_embedding_list.append(hidden_states[:, -1])
    return last_embedding_list


def test_layer_kl_equals_the_official_search_on_the_tiny_llava():
    lvlm = lvlm_for("llava")
    imgs, prompts = images(2), PROMPTS
    kl = cal.layer_kl(lvlm, imgs, prompts, start=1, batch_size=2)
    assert kl.shape == (2, 3)
    KL_di_total = []
    for i in range(2):
        batch = lvlm.prepare(imgs[i:i + 1], prompts[i:i + 1])
        image = (batch["input_ids"][0] == lvlm.model.config.image_token_id).nonzero().flatten()
        with torch.no_grad():
            out = lvlm.model(**batch, output_hidden_states=True)
            embeddings = official_findk_last_embeddings(lvlm.runner.model, out.hidden_states[0], int(image[0]), len(image), 1)
            logits = lvlm.runner.lm_head(out.hidden_states[-1])  # the full prefill (findk's plain loop), HF's own
            logits_list = [lvlm.runner.lm_head(e) for e in embeddings]
        KL_di_total.append(official_kl_list(logits.float(), [x.float() for x in logits_list]))
    torch.testing.assert_close(kl, torch.tensor(KL_di_total), rtol=1e-4, atol=1e-6)
    assert (kl > 0).all()
    alone = cal.layer_kl(lvlm, imgs, prompts, start=1, batch_size=1)  # batching does not change the values
    torch.testing.assert_close(alone, kl, rtol=1e-4, atol=1e-6)
    mean = kl.mean(0).tolist()
    for eta in [(a + b) / 2 for a, b in zip(sorted(mean), sorted(mean)[1:])]:  # between the means: no ties
        assert cal.first_below(mean, eta, start=1) == official_k(KL_di_total, eta, start=1)


# -- the store and the command ---------------------------------------------------------------------------
def test_store_round_trip_and_fingerprints(store):
    a, b = lvlm_for("llava"), lvlm_for("qwen2_vl")
    fa, fb = cal.model_fingerprint(a.runner.model), cal.model_fingerprint(b.runner.model)
    assert fa != fb and fa == cal.model_fingerprint(tp.load("tiny-llava").runner.model)  # same weights, same print
    assert cal.stored_k(model="tiny-llava") is None and cal.stored_k(fingerprint=fa) is None
    path = cal.store_k("tiny-llava", 3, fa, eta=0.1)
    assert path == store / "vtw_k.json"
    assert cal.stored_k(model="tiny-llava") == 3 and cal.stored_k(fingerprint=fa) == 3 and cal.stored_k(fingerprint=fb) is None
    cal.store_k("tiny-llava", 2, fa)  # recalibrating replaces
    assert cal.stored_k(model="tiny-llava") == 2 and json.loads(path.read_text())["tiny-llava"]["k"] == 2
    path.write_text("{not json")
    with pytest.raises(tp.TokenpruneError, match="cannot read"):
        cal.stored_k(model="tiny-llava")


def test_calibrate_command_then_vtw_uses_the_stored_k(store, bind_hook, capsys):
    args = ("calibrate", "vtw", "--model", "tiny-llava", "--task", "shapes_scene", "--limit", "2", "--start", "1",
            "--device", "cpu")
    with pytest.raises(tp.TokenpruneError, match=r"no layer in 1\.\.3 reaches mean KL <= eta=0 .*nothing stored") as exc:
        cli(*args, "--eta", "0")
    assert "\n" not in str(exc.value) and not (store / "vtw_k.json").exists()
    table = capsys.readouterr().out
    mean = {int(line.split()[0]): float(line.split()[1]) for line in table.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])}
    assert sorted(mean) == [1, 2, 3]
    eta = sorted(mean.values())[1]  # the second smallest mean: K is the first layer at or below it
    expected = min(layer for layer, v in mean.items() if v <= eta)
    assert cli(*args, "--eta", repr(eta)) == 0
    out = capsys.readouterr().out
    assert f"K = {expected}:" in out and f"{expected} " in out.split("<- K")[0].splitlines()[-1]
    assert cal.stored_k(model="tiny-llava") == expected

    lvlm = lvlm_for("llava")  # the same weights, built separately: found by fingerprint
    counter = LayerInputCounter(lvlm.runner.layers)
    try:
        gen = lvlm.generate(images(1), PROMPTS[:1], pruner=tp.create_pruner("vtw"), max_new_tokens=1)
    finally:
        counter.close()
    n_visual = gen.stats[0].visual_tokens_in
    lengths = [counter.lengths[i][0] for i in range(4)]
    assert lengths == [lengths[0]] * expected + [lengths[0] - n_visual] * (4 - expected)
    assert gen.stats[0].visual_per_layer == [n_visual] * expected + [0] * (4 - expected)


def test_bad_arguments_are_one_line(store):
    for extra, match in [(("--limit", "0"), "--limit must be >= 1"), (("--batch-size", "0"), "--batch-size"),
                         (("--eta", "-1"), "--eta must be"), (("--start", "9"), r"--start must be in 1\.\.3")]:
        with pytest.raises(tp.TokenpruneError, match=match) as exc:
            cli("calibrate", "vtw", "--model", "tiny-llava", "--task", "shapes_scene", "--limit", "1", "--device", "cpu", *extra)
        assert "\n" not in str(exc.value)
