"""adn — adaptive depth networks with sub-path specialization.

    import adn, torchvision
    net = adn.convert(torchvision.models.resnet50())
    net.skip = "TTFF"; y = net(x)
"""
from .backends import CompiledDepths, compile_depths
from .checkpoint import load
from .convert import StageSpec, convert, register_adapter, split_point, supported_families
from .depth_statistics import drop_depth_statistics, record_depth_statistics
from .depth_table import DepthTable
from .distill import SubPathDistillationLoss
from .governor import Decision, Governor
from .layers import SkipAwareNorm, SkippableBlock, SkippableStage
from .models import available_models, build_model
from .network import AdaptiveDepthNetwork
from .predict import Predictor
from .preprocess import Preprocessing
from .recalibrate import recalibrate_norms
from .skip import SkipConfig

__version__ = "0.1.0"

__all__ = [
    "AdaptiveDepthNetwork", "CompiledDepths", "Decision", "DepthTable", "Governor", "Predictor", "Preprocessing", "SkipAwareNorm", "SkipConfig", "SkippableBlock", "SkippableStage", "StageSpec",
    "SubPathDistillationLoss", "available_models", "build_model", "compile_depths", "convert", "drop_depth_statistics", "load", "recalibrate_norms", "record_depth_statistics", "register_adapter", "split_point",
    "supported_families",
]
