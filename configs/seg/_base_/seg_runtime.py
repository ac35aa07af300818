# Runtime shared by the segmentation linear probes (densedino-eval seg): mmseg scope, our
# registered modules, hooks, logging. The run-specific entries (checkpoint, data folder, classes,
# head width) are filled in by densedino-eval seg (densedino.evaluation.seg.probe).
default_scope = "mmseg"
custom_imports = dict(
    imports=[
        "densedino.evaluation.seg.backbone",
        "densedino.evaluation.seg.head",
        "densedino.evaluation.seg.dataset",
        "densedino.evaluation.seg.metric",
    ],
    allow_failed_imports=False,
)

# mmseg's EncoderDecoder on our frozen backbone; each protocol adds its input size, decode head
# and test mode.
model = dict(
    type="EncoderDecoder",
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
    ),
    # checkpoint (+ arch, which), or timm + weights: filled in from densedino-eval seg's options
    backbone=dict(
        type="FrozenViTBackbone",
        checkpoint=None,
        arch=None,
        which="teacher",
        timm=None,
        weights=None,
    ),
    train_cfg=dict(),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),  # densedino-eval seg switches to gloo without a GPU
)
randomness = dict(seed=0, deterministic=False)

# No validation while training: the probe is scored once, on the test loop, at the end.
val_dataloader = None
val_evaluator = None
val_cfg = None
test_cfg = dict(type="TestLoop")
test_evaluator = dict(type="ProbeIoUMetric", iou_metrics=["mIoU"], ignore_index=255)

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),
    param_scheduler=dict(type="ParamSchedulerHook"),
    # Only the final head (and the frozen backbone it sits on) is kept.
    checkpoint=dict(type="CheckpointHook", interval=-1, save_last=True, max_keep_ckpts=1),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
visualizer = dict(
    type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"
)
log_level = "INFO"
load_from = None
resume = False
