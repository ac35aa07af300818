"""`densedino-train` as a user runs it: CPU training, export, SIGKILL + resume, torchrun,
corrupt images and atomic checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runs import ROOT, launch, logged_by_step, run

from densedino.data import write_demo_dataset
from densedino.train.checkpoint import atomic_write, find_resume_checkpoint, is_complete
from densedino.train.data import SSLImageDataset, ssl_collate

TRAIN = [sys.executable, "-m", "densedino.cli.train"]

pytestmark = pytest.mark.slow

# A test-sized DenseDINO: 2 blocks, 32 px views, 60 images -> 7 iterations of 8 per epoch.
TINY_CONFIG = """
_base_ = ["{root}/configs/demo/densedino_vit-t_demo.py"]
model = dict(method=dict(out_dim=128, head=dict(hidden_dim=64, bottleneck_dim=32),
                         backbone=dict(img_size=32, depth=2)))
train_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    dataset=dict(root="{data}", views=dict(global_size=32, local_size=32)),
)
train_cfg = dict(max_epochs={epochs})
log_processor = dict(window_size=1)
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval={ckpt_every}, by_epoch={by_epoch}))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_demo_dataset(root / "demo", num_images=75, seed=0, image_size=64, workers=1)
    train = root / "demo" / "imagenet" / "train"
    assert sum(1 for _ in train.rglob("*.jpg")) == 60
    return train


KILL_HOOK = """
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillAtIterHook(Hook):
    priority = "LOWEST"  # after the checkpoint hook of the same iteration

    def __init__(self, iteration):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def write_config(path: Path, data: Path, batch=8, epochs=2, ckpt_every=1, by_epoch=True) -> Path:
    text = TINY_CONFIG.format(
        root=ROOT, data=data, batch=batch, epochs=epochs, ckpt_every=ckpt_every, by_epoch=by_epoch
    )
    path.write_text(text)
    return path


def test_train_exports_a_backbone_that_timm_loads(tmp_path: Path, data_dir: Path) -> None:
    import timm

    from densedino import load_backbone

    config = write_config(tmp_path / "cfg.py", data_dir)
    run(*TRAIN, config, "--work-dir", tmp_path / "run")
    export = tmp_path / "run" / "export"
    meta = json.loads((export / "backbone.json").read_text())
    assert meta["method"] == "DenseDINO" and meta["epoch"] == "2" and meta["patch_size"] == "8"
    ours = load_backbone(export / "backbone.safetensors")
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, patch_size=8, img_size=32, depth=2, num_classes=0
    )
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(export / "backbone.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x)["cls"], ref.forward_features(x)[:, 0])
    # `densedino-train export` gives the same weights from the last checkpoint.
    run(*TRAIN, "export", tmp_path / "run" / "epoch_2.pth", tmp_path / "again")
    again = load_backbone(tmp_path / "again" / "backbone.safetensors")
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    losses = logged_by_step(tmp_path / "run", "loss")
    assert sorted(losses) == list(range(1, 15)) and all(v == v for v in losses.values())


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path, data_dir: Path):
    # 7 iterations per epoch, 3 epochs; checkpoints every 4 iterations; killed at iteration 10,
    # i.e. in the middle of the second epoch, with iter_8 (1 iteration into it) the newest.
    config = write_config(tmp_path / "cfg.py", data_dir, epochs=3, ckpt_every=4, by_epoch=False)
    run(*TRAIN, config, "--work-dir", tmp_path / "straight")
    reference = logged_by_step(tmp_path / "straight", "loss")

    (tmp_path / "kill_hook.py").write_text(KILL_HOOK)
    killer = tmp_path / "killer.py"
    killer.write_text(
        f"_base_ = ['{config}']\n"
        "custom_imports = dict(imports=['densedino.train', 'kill_hook'])\n"
        "custom_hooks = [dict(type='KillAtIterHook', iteration=10)]\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    killed = launch(*TRAIN, killer, "--work-dir", tmp_path / "resumed", env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert find_resume_checkpoint(tmp_path / "resumed").name == "iter_8.pth"

    resumed = run(*TRAIN, config, "--work-dir", tmp_path / "resumed", "--resume", "auto")
    assert "resuming epoch 1 after 1 iterations" in resumed
    after = logged_by_step(tmp_path / "resumed", "loss")
    assert sorted(after) == list(range(1, 22))
    for step in range(9, 22):  # every step after the checkpoint, replayed exactly
        assert after[step] == pytest.approx(reference[step], abs=1e-6), step


def test_torchrun_two_processes_match_one_process_with_double_batch(tmp_path, data_dir):
    single = write_config(tmp_path / "single.py", data_dir, batch=8, epochs=1)
    double = write_config(tmp_path / "double.py", data_dir, batch=4, epochs=1)
    run(*TRAIN, single, "--work-dir", tmp_path / "one")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "densedino.cli.train",
    ]
    run(*torchrun, double, "--work-dir", tmp_path / "two", "--launcher", "pytorch")
    one, two = logged_by_step(tmp_path / "one", "loss"), logged_by_step(tmp_path / "two", "loss")
    assert two[1] == pytest.approx(one[1], abs=1e-5)


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted(data_dir.rglob("*.jpg"))[:6]
    for i, path in enumerate(good):
        (folder / f"{i}.jpg").write_bytes(path.read_bytes())
    (folder / "0.jpg").write_bytes(b"not an image at all")
    (folder / "3.jpg").write_bytes(good[3].read_bytes()[:200])  # truncated JPEG
    dataset = SSLImageDataset(str(folder), views=dict(global_size=32, num_points=2))
    batch = ssl_collate([dataset[i] for i in range(len(dataset))])
    assert int(batch["corrupt"]) == 2 and batch["views"][0].shape[0] == 6

    config = write_config(tmp_path / "cfg.py", folder, batch=2, epochs=1)
    output = run(*TRAIN, config, "--work-dir", tmp_path / "run")
    assert "2 unreadable images skipped" in output


def test_atomic_write_survives_sigkill(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pth"
    payload_mb = 64
    writer = (
        "import sys; from densedino.train.checkpoint import atomic_write\n"
        f"data = bytes([7]) * ({payload_mb} << 20)\n"
        "while True: atomic_write(sys.argv[1], data)\n"
    )
    for delay in (0.5, 0.9, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(target)], cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():  # complete or absent, never partial
            assert target.stat().st_size == payload_mb << 20
    # A kill can leave a hidden temporary file, which the resume finder never picks.
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert all(p.name.startswith(".ckpt.pth.") and p.suffix == ".tmp" for p in leftovers)


def test_resume_finder_skips_incomplete_files(tmp_path: Path) -> None:
    good = tmp_path / "epoch_1.pth"
    torch.save({"x": torch.ones(2)}, good)
    bad = tmp_path / "epoch_2.pth"
    bad.write_bytes(good.read_bytes()[:50])  # a truncated file written by something else
    (tmp_path / "last_checkpoint").write_text(str(bad))
    assert is_complete(good) and not is_complete(bad)
    assert find_resume_checkpoint(tmp_path) == good
    atomic_write(tmp_path / "last_checkpoint", str(good).encode())
    assert find_resume_checkpoint(tmp_path) == good


class RecordingLogger:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.infos: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def info(self, message: str) -> None:
        self.infos.append(message)


def test_collapse_monitor_flags_collapse_and_a_nearly_uniform_teacher() -> None:
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from densedino.train.hooks import CollapseMonitorHook

    hook = CollapseMonitorHook(warmup_iters=2, stall_entropy=0.9, stall_window=3)
    logger = RecordingLogger()
    runner = SimpleNamespace(iter=0, logger=logger, message_hub=MessageHub("monitor-test"))

    def epoch(entropies: list[float], std: float = 0.5) -> None:
        for entropy in entropies:
            outputs = {"feature_std": std, "teacher_entropy": entropy, "corrupt": 0}
            hook.after_train_iter(runner, 0, outputs=outputs)
            runner.iter += 1
        hook.after_train_epoch(runner)

    # Above the stall bound during warm-up only, then healthy: nothing is logged.
    epoch([0.99, 0.99, 0.5, 0.6, 0.5])
    assert (logger.warnings, hook.collapsed_iters, hook.stalled_epochs) == ([], 0, 0)
    # Nearly uniform but below the collapse bound: one stall warning, no collapse.
    epoch([0.93, 0.95, 0.94])
    assert (hook.collapsed_iters, hook.stalled_epochs) == (0, 1)
    assert len(logger.warnings) == 1 and "teacher nearly uniform" in logger.warnings[0]
    assert "0.940" in logger.warnings[0]  # the mean over the window
    # Uniform: a collapse warning on its first iteration, and a stall at the epoch's end.
    epoch([0.999, 0.999, 0.999])
    assert (hook.collapsed_iters, hook.stalled_epochs) == (3, 2)
    assert "COLLAPSE WARNING" in logger.warnings[1] and len(logger.warnings) == 3
    # Features collapsed to a point with a sharp teacher: collapse, and no stall.
    epoch([0.2, 0.2, 0.2], std=0.01)
    assert (hook.collapsed_iters, hook.stalled_epochs) == (6, 2)
    hook.after_run(runner)
    assert (
        "6 iterations flagged as collapsed, 2 epochs with a nearly uniform teacher"
        in (logger.infos[-1])
    )
