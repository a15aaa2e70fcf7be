"""ctta: continual learning and test-time adaptation of CLIP models."""
from ctta.data import ImageTensorDataset, check_images
from ctta.hooks import AccuracyMatrix, JsonResults, StrategySummary, ZeroShotRetention, evaluate
from ctta.model import Clip
from ctta.online import OnlineAdapter, Prediction, wrap
from ctta.online_hooks import Latency, Memory, OnlineAccuracy
from ctta.loop import RunContext, RunMismatch, run, run_samples
from ctta.strategy import Strategy
from ctta.stream import LabelSpace, Task, TaskStream, class_incremental, domain_incremental

__version__ = "0.1.0"
__all__ = [
    "AccuracyMatrix", "Clip", "ImageTensorDataset", "JsonResults", "LabelSpace", "RunContext", "Strategy", "Task",
    "TaskStream", "ZeroShotRetention", "check_images", "class_incremental", "domain_incremental", "evaluate", "run",
    "Latency", "Memory", "StrategySummary", "OnlineAccuracy", "OnlineAdapter", "Prediction", "RunMismatch",
    "run_samples", "wrap",
]
