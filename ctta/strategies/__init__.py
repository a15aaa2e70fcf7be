"""One strategy per module; import them from here."""
from ctta.strategies.finetune import Finetune
from ctta.strategies.zeroshot import ZeroShot

__all__ = ["Finetune", "ZeroShot"]
