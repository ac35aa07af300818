"""mmengine glue for pretraining. Importing it registers the model, its DDP wrapper, the
dataset, sampler and collate function, the loop, hooks, optimizer constructor and the atomic
checkpoint backend (configs name them with ``custom_imports = ['densedino.train']``)."""

from densedino.train import checkpoint, data, hooks, loop, model, optim

__all__ = ["checkpoint", "data", "hooks", "loop", "model", "optim"]
