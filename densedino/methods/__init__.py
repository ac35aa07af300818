"""The self-supervised methods of the suite, each an :class:`SSLMethod` plug-in of the trainer."""

from densedino.methods.base import SSLMethod, StepState
from densedino.methods.densecl import DenseCL
from densedino.methods.densedino import DenseDINO
from densedino.methods.dino import DINO
from densedino.methods.selfpatch import SelfPatch

# Every method of the suite; densedino.train registers them in mmengine's MODELS.
METHODS: tuple[type[SSLMethod], ...] = (DINO, DenseDINO, SelfPatch, DenseCL)

__all__ = ["DINO", "METHODS", "DenseCL", "DenseDINO", "SSLMethod", "SelfPatch", "StepState"]
