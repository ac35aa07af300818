# Runtime shared by every pretraining config: mmengine hooks, logging, checkpoints.
custom_imports = dict(imports=["densedino.train"], allow_failed_imports=False)
default_scope = None

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),  # densedino-train switches to gloo without a GPU
)
randomness = dict(seed=0, deterministic=False)

train_cfg = dict(type="ResumableEpochLoop", max_epochs=100)
# AdamW on DINO's two parameter groups; lr and weight decay are set every iteration by
# DINOScheduleHook from `schedule` below (densedino-train adds the hook). `fused`: one kernel per
# parameter instead of about ten passes; on CPU torch's default is the per-tensor loop, 3x slower
# over a ViT-S and its two 65536-prototype heads (docs/benchmarks.md, Training step).
optim_wrapper = dict(
    constructor="DINOOptimWrapperConstructor",
    optimizer=dict(type="AdamW", lr=5e-4, weight_decay=0.04, fused=True),
)
schedule = dict(
    lr=5e-4,  # for a total batch of base_batch_size; scaled linearly
    base_batch_size=256,
    min_lr=1e-6,
    warmup_epochs=10,
    weight_decay=0.04,
    weight_decay_end=0.4,
    momentum=0.996,
    momentum_end=1.0,
    teacher_temp=0.04,
    warmup_teacher_temp=0.04,
    warmup_teacher_temp_epochs=0,
)

default_hooks = dict(
    runtime_info=dict(type="DeferredRuntimeInfoHook"),  # logs without a sync per step
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=10),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(
        type="CheckpointHook",
        interval=1,
        by_epoch=True,
        max_keep_ckpts=3,
        save_last=True,
        backend_args=dict(backend="atomic_local"),  # write-then-rename: never truncated
    ),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
custom_hooks = [dict(type="CollapseMonitorHook"), dict(type="ExportBackboneHook")]

model_wrapper_cfg = dict(type="SSLDistributedDataParallel")
visualizer = dict(
    type="Visualizer",
    vis_backends=[dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")],
)
log_processor = dict(by_epoch=True, window_size=10)
log_level = "INFO"
load_from = None
resume = False
