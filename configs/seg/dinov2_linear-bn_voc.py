# DINOv2's "linear" segmentation probe (Oquab et al., 2023), for comparison with Leopart's:
# BatchNorm + 1x1 conv on the last-layer patch tokens, logits upsampled to the label size.
# Train on VOC 2012 trainaug: random rescale of (2048, 512) by 0.5-2, 512 crops
# (cat_max_ratio 0.75), hflip, photometric distortion; AdamW lr 1e-3, wd 1e-4, linear warm-up
# over 1,500 iterations then poly (power 1) to 0, 40k iterations.
# Test on val at the original resolution: (2048, 512) rescale, 512 sliding window, stride 341.
_base_ = ["./_base_/seg_runtime.py", "./_base_/voc_data.py"]

crop_size = (512, 512)
num_classes = 21

model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(
        type="LinearProbeHead",
        in_channels=384,  # set from the checkpoint by densedino-eval seg
        num_classes=num_classes,
        norm_cfg=dict(type="SyncBN", requires_grad=True),  # plain BN outside torchrun
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(341, 341)),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2048, 512), keep_ratio=True),
    dict(type="LoadAnnotations"),  # after the resize: scored at the original resolution
    dict(type="PackSegInputs"),
]
# VOC trainaug / val folders, workers and the test sampler: _base_/voc_data.py.
train_dataloader = dict(
    batch_size=16,  # per process: DINOv2 used 8 GPUs x 2 images
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(pipeline=train_pipeline),
)
test_dataloader = dict(
    batch_size=1,  # images keep their aspect ratio: sizes differ
    dataset=dict(pipeline=test_pipeline),
)

train_cfg = dict(type="IterBasedTrainLoop", max_iters=40000)
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4),
)
auto_scale_lr = dict(enable=False, base_batch_size=16)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=40000),
]
# Iteration-based: the runtime's hooks (_base_/seg_runtime.py) count iterations, not epochs.
default_hooks = dict(logger=dict(log_metric_by_epoch=False), checkpoint=dict(by_epoch=False))
log_processor = dict(by_epoch=False)
