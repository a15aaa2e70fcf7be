"""A user's own strategy, plugged in without touching ctta: train only the image tower's normalisation layers
(LayerNorms of a ViT, BatchNorms of a ResNet tower such as the embedded micro-CLIP's)."""
import torch
import torch.nn.functional as F

from ctta import Strategy
from ctta.checks import check_optimizer


class NormTuning(Strategy):
    def __init__(self, lr: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        check_optimizer("NormTuning", lr)  # a NaN or non-positive lr is refused now, by name, not mid-run
        self.lr = lr

    def setup(self, model):
        super().setup(model)  # freezes everything
        norm = (".ln_", ".bn")  # open_clip's names: ViT "visual.transformer.resblocks.0.ln_1", ResNet "visual.bn1"
        params = model.unfreeze(lambda name, p: name.startswith("visual.") and any(k in name for k in norm))
        self.optimizer = torch.optim.AdamW(params, lr=self.lr)

    def learn(self, images, labels, space):
        m = self.model
        logits = m.logits(m.encode_image(images), m.text_head(space))  # text tower frozen: cached head
        loss = F.cross_entropy(logits, labels)
        self.step(loss)  # guarded backward/step: a NaN loss is skipped and counted
        return {"loss": loss.item()}
