"""Can the LoRA say a place when the tokens are perfect? Feed the alignment *targets* (description + side words on
actor tokens, `--place-halves --place-actors-only`) instead of the projector output and score the aux_x / aux_y reads.
    python training/demo_video/ideal_tokens_probe.py  (reads runs/demo-video-train-v7/checkpoint.pt)
"""
import torch, random
from tokenprune.zoo.train_demo_video import (questions, aux_questions, pick_aux, VideoBatcher, token_labels, token_places,
    place_vectors, first_token_accuracy, target_words)
from tokenprune.zoo.train_demo import add_lora
from tokenprune.zoo.demo_video import build_demo_video
torch.set_num_threads(2)
model, processor = build_demo_video(weights=None)
add_lora(model.model.language_model, 8, 16.0)
model.load_state_dict(torch.load("runs/demo-video-train-v7/checkpoint.pt")["trainable"], strict=False)
val = questions("val", 240, 10)
emb = model.model.language_model.embed_tokens
w, table = target_words(emb, processor.tokenizer)
items, ideal = [], []
for i, (s, _) in enumerate(val):
    d = pick_aux([x for x in aux_questions(s) if x[2] in ("aux_x", "aux_y")])
    if d:
        q = d(random.Random(i)); items.append((len(ideal), *q))
        codes, shows = token_labels(s, 112, 4); pl = token_places(s, 112, 4); pl[~shows] = float("nan")
        ideal.append(table[codes] + place_vectors(pl, w, halves=True))
feats = torch.stack(ideal)  # already projected: bypass the projector
class Id(torch.nn.Module):
    def forward(self, x): return x
model.model.multi_modal_projector = Id()
b = VideoBatcher(model, processor)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    print("ideal tokens (the alignment targets):", first_token_accuracy(model, b, feats.unsqueeze(2), items))
