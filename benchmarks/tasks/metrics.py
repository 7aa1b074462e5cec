"""Answer normalisation and scoring rules shared by tasks, as the official evaluations define them.

* :func:`normalize_vqa_answer` / :func:`vqa_accuracy`: the VQA evaluation (VQAv2, TextVQA):
  punctuation, number words, articles and contractions normalised; accuracy
  ``min(#humans who gave the answer / 3, 1)`` averaged over the 10 leave-one-out subsets of 9.
* :func:`normalize_exact`: exact match ignoring case and punctuation (GQA).
* :func:`extract_option`: the option letter in a free-form answer, by MMBench's rules (no LLM judge).
* :func:`parse_yes_no`: MME's yes/no reading of an answer.
"""
from __future__ import annotations

import re
import string
from typing import Mapping, Sequence

# The official VQA evaluation's tables: contractions written without apostrophes, number words.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("yes." but not "2.5")


def _strip_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # Punctuation next to a space (or any text with a 1,000-style number) is deleted; inside a
        # word it becomes a space ("black-and-white" -> "black and white").
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """The VQA evaluation's normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``."""
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of ``prediction`` against the human ``answers`` (10 for VQAv2 / TextVQA).

    For each leave-one-out subset of ``n - 1`` answers: ``min(matches / 3, 1)``; averaged.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # Leaving out answer i removes one match exactly when answer i matches.
    accs = [min(1.0, (matches - (r == pred)) / 3.0) for r in refs]
    return sum(accs) / len(accs)


def normalize_exact(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (exact match ignoring case/punctuation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


_DECORATIONS = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]


def extract_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer picks, or ``None`` if it cannot be told without a judge.

    MMBench's rules: a lone letter token (``"B"``), else exactly one decorated letter (``"B."``,
    ``"(B)"``, ``"(B)."``, ``":B"``...), else exactly one option text contained in the answer.
    """
    letters = sorted(options)
    tokens = [t.strip() for t in prediction.split()]
    bare = [c for c in letters if c in tokens]
    # "A" in a long answer may be an article ("A dog on a mat"): do not read it as the option.
    if len(bare) == 1 and not (bare[0] == "A" and len(tokens) > 3):
        return bare[0]
    for pre, post in _DECORATIONS:
        hits = [c for c in letters if pre + c + post in tokens]
        if len(hits) == 1:
            return hits[0]
    lower = prediction.lower()
    hits = [c for c in letters if str(options[c]).lower() in lower]
    return hits[0] if len(hits) == 1 else None


def parse_yes_no(prediction: str) -> str:
    """MME's reading of an answer: ``"yes"``, ``"no"`` or ``"other"``."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"
