"""Put TPT in front of a deployed CLIP: every request predicts and adapts.  python examples/online_tpt.py

The deployment is the four lines under "deploy". A real one wraps its own open_clip model the same way:

    net, _, _ = open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")
    adapter = ctta.wrap(net, TPT(), classnames, tokenizer=open_clip.get_tokenizer("ViT-B-16"))
    adapter(pil_image).classnames                     # PIL images are preprocessed by the adapter
"""
import torch

import ctta
from ctta.model import BUILTIN_WEIGHTS
from ctta.strategies.tpt import TPT
from streams.world import combo_space, shift_tasks

# deploy: the embedded micro-CLIP (random weights if they are not built yet), 100 "colour shape" classes
clip = ctta.Clip.from_pretrained("micro-clip", "builtin" if BUILTIN_WEIGHTS.exists() else None)
# the adapter owns the reset policy: "episodic" (TPT's protocol), "never" (online TPT), k samples, or a drift signal
adapter = ctta.wrap(clip, TPT(ctx_init="a"), combo_space(),
                     reset="episodic")  # the world prompts "a {}.": untuned TPT = zero-shot

# requests: noisy images of the built-in world, one at a time (labels only to print a score)
task = shift_tasks(["gaussian_noise"], severity=3, per_class=1).tasks[0]
images, labels = task.test.get_batch(torch.arange(20))
hits = 0
for x, y in zip(images, labels):
    out = adapter(x[None])                            # logits, probs, predicted class names; adapted on the way
    hits += int(out.index[0] == y)
print(f"episodic TPT: {hits}/20 correct, last prediction {out.classnames[0]!r} (p={out.probs.max():.2f}), "
      f"skipped updates {adapter.skipped_steps}")
with adapter.paused():                                # serve without adapting
    print("paused:", adapter(images[:4]).classnames)
print("adapted state ->", adapter.save("runs/examples/online_tpt_state.pt"))
