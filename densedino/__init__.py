"""densedino: dense self-supervised ViT pretraining (DenseDINO, DINO), evaluation and serving.

The public entry points of the core library::

    from densedino import build_backbone, load_backbone, save_backbone
"""

from densedino.models.vit import VisionTransformer, build_backbone
from densedino.weights import load_backbone, save_backbone

__version__ = "0.1.0"
__all__ = ["VisionTransformer", "__version__", "build_backbone", "load_backbone", "save_backbone"]
