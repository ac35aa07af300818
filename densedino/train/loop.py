"""Epoch loop that resumes mid-epoch at the exact next batch."""

from __future__ import annotations

from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop


@LOOPS.register_module()
class ResumableEpochLoop(EpochBasedTrainLoop):
    """mmengine's epoch loop restarts an interrupted epoch from its first batch; this one asks
    the sampler (:class:`densedino.train.data.EpochSampler`) to skip the batches already done."""

    def run_epoch(self) -> None:
        done = self._iter - self._epoch * len(self.dataloader)
        if done > 0:
            self.runner.logger.info(f"resuming epoch {self._epoch} after {done} iterations")
            self.dataloader.sampler.skip_next(done * self.dataloader.batch_size)
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        for idx, data_batch in enumerate(self.dataloader, start=max(done, 0)):
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1
