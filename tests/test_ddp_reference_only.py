"""DenseDINO with ``alpha=0`` (the reference loss alone) trains under torchrun: 2 gloo processes,
3 steps. DDP requires every trainable parameter to get a gradient in every step (or it fails on
the next one), so a student CLS head that the loss never reaches must not count as trainable."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from cli_runs import logged_by_step, run, small_run_config

from densedino.data import write_demo_dataset

pytestmark = pytest.mark.slow

# 30 scenes -> 24 training images; 2 ranks x batches of 4 -> 3 iterations in one epoch.
CONFIG = small_run_config("densedino_vit-t_demo.py", "alpha=0.0, ")


def test_reference_loss_alone_trains_under_ddp(tmp_path: Path) -> None:
    data = write_demo_dataset(tmp_path / "demo", num_images=30, image_size=64, workers=1)
    config = tmp_path / "ref_only.py"
    config.write_text(CONFIG)
    work = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "densedino.cli.train"]  # fmt: skip
    run(*torchrun, config, "--work-dir", work, "--launcher", "pytorch",
        "--cfg-options", f"train_dataloader.dataset.root={data.imagenet_train}",
        "train_dataloader.batch_size=4", "train_cfg.max_epochs=1", timeout=600)  # fmt: skip
    loss = logged_by_step(work, "loss")
    assert sorted(loss) == [1, 2, 3]
    assert all(math.isfinite(v) for v in loss.values())
    assert set(logged_by_step(work, "loss_cls").values()) == {0.0}
    assert all(v > 0 for v in logged_by_step(work, "loss_ref").values())
