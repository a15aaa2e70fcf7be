"""One strategy per module; import them from here."""
from ctta.strategies.boost_adapter import BoostAdapter
from ctta.strategies.dmn import DMN
from ctta.strategies.dpe import DPE
from ctta.strategies.finetune import Finetune
from ctta.strategies.lora_ft import LoRA
from ctta.strategies.lwf import LwF
from ctta.strategies.rank_lora import RankSelectiveLoRA
from ctta.strategies.rapf import RAPF
from ctta.strategies.tda import TDA
from ctta.strategies.tent import Tent
from ctta.strategies.tpt import TPT
from ctta.strategies.vr_lwf import VRLwF
from ctta.strategies.zero import ZERO
from ctta.strategies.zeroshot import ZeroShot

__all__ = ["BoostAdapter", "DMN", "DPE", "Finetune", "LoRA", "LwF", "RAPF", "RankSelectiveLoRA", "TDA", "TPT", "Tent",
           "VRLwF", "ZERO", "ZeroShot"]
