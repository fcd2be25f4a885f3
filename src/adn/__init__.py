"""adn — adaptive depth networks with sub-path specialization.

import adn, torchvision
net = adn.convert(torchvision.models.resnet50())
net.skip = "TTFF"; y = net(x)
"""

from .runtime.backends import CompiledDepths, compile_depths
from .vision.checkpoint import load
from .convert import StageSpec, convert, register_adapter, split_point, supported_families
from .core.depth_statistics import drop_depth_statistics, record_depth_statistics
from .deploy.depth_table import DepthTable
from .core.distill import SubPathDistillationLoss
from .deploy.governor import Decision, Governor
from .core.layers import SkipAwareNorm, SkippableBlock, SkippableStage
from .models import available_models, build_model
from .core.network import AdaptiveDepthNetwork
from .deploy.predict import Predictor
from .vision.preprocess import Preprocessing
from .core.recalibrate import recalibrate_norms
from .core.skip import SkipConfig

__version__ = "0.1.0"

__all__ = [
    "AdaptiveDepthNetwork",
    "CompiledDepths",
    "Decision",
    "DepthTable",
    "Governor",
    "Predictor",
    "Preprocessing",
    "SkipAwareNorm",
    "SkipConfig",
    "SkippableBlock",
    "SkippableStage",
    "StageSpec",
    "SubPathDistillationLoss",
    "available_models",
    "build_model",
    "compile_depths",
    "convert",
    "drop_depth_statistics",
    "load",
    "recalibrate_norms",
    "record_depth_statistics",
    "register_adapter",
    "split_point",
    "supported_families",
]
