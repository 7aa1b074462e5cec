"""Prompt control: ``chat_template=False`` (prompts as given), processors without a chat template,
and one-line errors for model paths that hold no model.

The raw path is checked against the templated one on the tiny models: the same text, written out
by hand from the processor's own template, must give the same input ids, tokens and logits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.errors import OptionError, TokenpruneError, UnknownNameError
from tokenprune.zoo import tiny

PLACEHOLDERS = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                "internvl": "<IMG_CONTEXT>"}
PROMPTS = ["what color is the shape ?", "how many circle are there ?"]


def lvlm_for(family: str):
    torch.manual_seed(0)
    return tp.wrap(*getattr(tiny, f"tiny_{family}")())


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # two sizes: Qwen2-VL gets different token counts, so the batch is really left-padded
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 64), (48, 80))]


def templated(lvlm, prompt: str) -> str:
    """What the processor's own chat template makes of ``prompt`` (independent of tokenprune's code)."""
    return lvlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=False)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("family", sorted(PLACEHOLDERS))
def test_raw_prompt_equals_templated(family):
    lvlm = lvlm_for(family)
    assert lvlm.image_placeholder == PLACEHOLDERS[family]
    raw = [templated(lvlm, p) for p in PROMPTS]
    assert all(PLACEHOLDERS[family] in r for r in raw)
    imgs = images()
    a = lvlm.encode(imgs, PROMPTS)
    b = lvlm.encode(imgs, raw, chat_template=False)
    assert torch.equal(a.batch["input_ids"], b.batch["input_ids"])
    assert torch.equal(a.batch["attention_mask"], b.batch["attention_mask"])
    pruner = tp.create_pruner("random", ratio=0.5)
    for p in (None, pruner):
        x = lvlm.generate(imgs, PROMPTS, pruner=p, max_new_tokens=3, ignore_eos=True)
        y = lvlm.generate(imgs, raw, pruner=p, max_new_tokens=3, ignore_eos=True, chat_template=False)
        assert torch.equal(x.token_ids, y.token_ids)
        assert torch.equal(x.first_logits, y.first_logits)
        assert [s.text_tokens for s in x.stats] == [s.text_tokens for s in y.stats]
    conts = ["red", "two"]
    x = lvlm.loglikelihood(imgs, PROMPTS, conts)
    y = lvlm.loglikelihood(imgs, raw, conts, chat_template=False)
    assert x.logprobs == y.logprobs and torch.equal(x.first_logits, y.first_logits)


def test_raw_prompt_differs_from_templated():
    """The switch does something: the bare question, placed raw, is not the templated prompt."""
    lvlm = lvlm_for("llava")
    x = lvlm.encode(images(), PROMPTS)
    y = lvlm.encode(images(), [f"<image>\n{p}" for p in PROMPTS], chat_template=False)
    assert x.batch["input_ids"].shape[1] > y.batch["input_ids"].shape[1]


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_image_placeholder_is_mapped_to_the_family_one(family):
    lvlm = lvlm_for(family)
    ours = lvlm.encode(images(), [f"<image>\n{p}" for p in PROMPTS], chat_template=False)
    theirs = lvlm.encode(images(), [f"{PLACEHOLDERS[family]}\n{p}" for p in PROMPTS], chat_template=False)
    assert torch.equal(ours.batch["input_ids"], theirs.batch["input_ids"])


@pytest.mark.parametrize("family", sorted(PLACEHOLDERS))
def test_missing_placeholder_is_one_line_naming_it(family):
    lvlm = lvlm_for(family)
    with pytest.raises(OptionError) as err:
        lvlm.generate(images()[:1], [PROMPTS[0]], chat_template=False, max_new_tokens=1)
    assert PLACEHOLDERS[family] in one_line(err.value) and "chat_template=False" in str(err.value)
    with pytest.raises(OptionError, match="one image") as err:
        lvlm.loglikelihood(images()[:1], [f"{PLACEHOLDERS[family]} a {PLACEHOLDERS[family]}"], ["red"],
                           chat_template=False)
    one_line(err.value)


def test_qwen_image_pad_alone_is_not_enough():
    """The processor would accept it, but without <|vision_start|> M-RoPE finds no image."""
    lvlm = lvlm_for("qwen2_vl")
    with pytest.raises(OptionError, match=r"vision_start"):
        lvlm.encode(images()[:1], ["<|image_pad|>what ?"], chat_template=False)


def test_processor_without_template_gets_llava_15_format():
    lvlm = lvlm_for("llava")
    expected = lvlm.generate(images(), PROMPTS, max_new_tokens=3, ignore_eos=True)
    lvlm.processor.chat_template = None
    assert lvlm.tokenizer.chat_template is None
    assert lvlm.prompt_texts(["what ?"]) == ["USER: <image>\nwhat ? ASSISTANT:"]
    assert lvlm.prompt_texts(["Look: <image> what ?"]) == ["USER: Look: <image>\nwhat ? ASSISTANT:"]
    out = lvlm.generate(images(), PROMPTS, max_new_tokens=3, ignore_eos=True)  # as a new user would call it
    # the tiny model's own template is LLaVA-1.5's format: the default gives the very same run
    assert torch.equal(out.token_ids, expected.token_ids) and torch.equal(out.first_logits, expected.first_logits)


def test_processor_without_template_gets_qwen2_vl_format():
    lvlm = lvlm_for("qwen2_vl")
    lvlm.processor.chat_template = None
    assert lvlm.prompt_texts(["what ?"]) == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>what ?<|im_end|>\n<|im_start|>assistant\n"]
    assert lvlm.generate(images(), PROMPTS, max_new_tokens=1).stats[0].visual_tokens_in > 0


@pytest.mark.parametrize("family", ["internvl", "llava_next"])
def test_processor_without_template_and_no_standard_format_is_one_line(family):
    lvlm = lvlm_for(family)
    lvlm.processor.chat_template = None
    with pytest.raises(OptionError) as err:
        lvlm.generate(images(), PROMPTS, max_new_tokens=1)
    msg = one_line(err.value)
    assert "no chat template" in msg and "processor.chat_template" in msg and "chat_template=False" in msg
    assert repr(lvlm.image_placeholder) in msg
    # the way out it names works
    raw = [f"{lvlm.image_placeholder}\n{p}" for p in PROMPTS]
    assert lvlm.generate(images(), raw, max_new_tokens=1, chat_template=False).stats[0].visual_tokens_in > 0


def test_tokenizer_template_is_used_only_if_it_places_the_image():
    lvlm = lvlm_for("internvl")
    template = lvlm.processor.chat_template
    lvlm.processor.chat_template = None
    lvlm.tokenizer.chat_template = template  # a multimodal template saved with the tokenizer only
    assert lvlm.prompt_texts(["what ?"]) == ["<|im_start|>user\n<IMG_CONTEXT>\nwhat ?<|im_end|>\n<|im_start|>assistant\n"]
    lvlm.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # text-only LLM template
    with pytest.raises(OptionError, match="no chat template"):
        lvlm.prompt_texts(["what ?"])


def test_template_that_drops_the_image_is_one_line():
    lvlm = lvlm_for("llava")
    lvlm.processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                                    "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    with pytest.raises(OptionError, match="no image placeholder") as err:
        lvlm.generate(images()[:1], ["what ?"], max_new_tokens=1)
    one_line(err.value)


# -- model paths ---------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenprune", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


@pytest.mark.parametrize("command", [["bench", "--limit", "1"], ["show"]])
def test_cli_model_folder_without_config_is_one_line_exit_2(tmp_path, command):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    out = tmp_path / "out"
    extra = ["--output", str(out / ("run" if command[0] == "bench" else "show.png"))]
    proc = run_cli(*command, "--model", str(empty), *extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenprune: error:") and "config.json" in lines[0], proc.stderr
    assert not out.exists()  # nothing was run


def _folder(tmp_path, config) -> str:
    path = tmp_path / "model"
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.mark.parametrize("config, match", [
    (None, "holds no config.json"),
    ("{broken", "cannot read"),
    ({"hidden_size": 8}, "has no model_type"),
])
def test_load_bad_folder_is_one_line(tmp_path, config, match):
    with pytest.raises(TokenpruneError, match=match) as err:
        tp.load(_folder(tmp_path, config))
    one_line(err.value)


@pytest.mark.parametrize("model_type", ["bert", "not_a_transformers_model"])
def test_load_unsupported_model_type_lists_families(tmp_path, model_type):
    with pytest.raises(UnknownNameError, match=f"{model_type}.*not supported.*llava.*qwen2_vl") as err:
        tp.load(_folder(tmp_path, {"model_type": model_type}))
    one_line(err.value)


def test_load_missing_path_and_file(tmp_path):
    with pytest.raises(TokenpruneError, match="does not exist"):
        tp.load(str(tmp_path / "nope"))
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(TokenpruneError, match="is a file"):
        tp.load(str(path))


def test_hub_ids_and_zoo_names_pass_the_local_check():
    from tokenprune.adapters import check_model_source

    check_model_source("some-org/some-model")  # only the hub can tell: not refused here
    check_model_source("tiny-llava")


def test_lmms_eval_model_passes_contexts_as_given():
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from tokenprune.integrations.lmms_eval.model import TokenPrune

    with pytest.raises(OptionError, match="chat_template must be true or false"):
        TokenPrune(pretrained="tiny-llava", chat_template="maybe")
    torch.manual_seed(0)
    model = TokenPrune(pretrained="tiny-qwen2-vl", chat_template="false", device="cpu")
    assert model.use_chat_template is False and model.chat_template is None  # lmms-eval's attribute untouched
    lvlm, image = model.lvlm, images()[1]
    model.task_dict = {"t": {"test": [{"image": image}]}}
    context = "<image>\nwhat color is the shape ?"  # a task's pre_prompt can write the whole format
    full = templated(lvlm, "what color is the shape ?")

    def request(kind, args):
        return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})

    visual = lambda d: [d["image"]]  # noqa: E731
    out = model.generate_until([request("generate_until", (full, {"max_new_tokens": 3}, visual, 0, "t", "test"))])
    ref = lvlm.generate([image], ["what color is the shape ?"], max_new_tokens=3, sample_ids=["t/test/0"])
    assert out[0].text == ref.texts[0]  # the templated text, passed raw, is the templated run
    out = model.loglikelihood([request("loglikelihood", (context, "red", visual, 0, "t", "test"))])
    ref = lvlm.loglikelihood([image], [context], ["red"], chat_template=False, sample_ids=["t/test/0"])
    assert out[0].text[0] == pytest.approx(-ref.logprobs[0])
    with pytest.raises(OptionError, match="vision_start"):  # a bare context has no image placeholder
        model.generate_until([request("generate_until", ("what ?", {"max_new_tokens": 1}, visual, 0, "t", "test"))])
