# Linear probe of Leopart (Ziegler & Asano, CVPR 2022), as used by DenseDINO (method reference,
# section 3): frozen backbone, last-layer patch tokens, 1x1 conv to 21 classes.
# Train on VOC 2012 trainaug: paired RandomResizedCrop 448 (scale 0.8-1) + hflip; features
# upsampled to 100 x 100 before the conv, labels nearest-resized to 100 x 100, CE ignoring 255;
# SGD lr 0.01 * batch / 60, momentum 0.9, wd 1e-4, x0.1 at epoch 20, 25 epochs.
# Test on val: image and labels resized to 448 x 448, logits upsampled to 448, argmax, one
# confusion matrix over the set, mean IoU over the 21 classes.
_base_ = ["./_base_/seg_runtime.py", "./_base_/voc_data.py"]

crop_size = (448, 448)
train_size = (100, 100)
num_classes = 21

model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(
        type="LinearProbeHead",
        in_channels=384,  # set from the checkpoint by densedino-eval seg
        num_classes=num_classes,
        train_size=train_size,
        init_cfg=None,  # PyTorch's default Conv2d init, as Leopart's nn.Conv2d
        loss_decode=dict(
            type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True
        ),
    ),
    test_cfg=dict(mode="whole"),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="PairedRandomResizedCrop", size=crop_size, scale=(0.8, 1.0)),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    # Pillow, as Leopart's torchvision resize of PIL images (image bilinear, labels nearest).
    dict(type="Resize", scale=crop_size, keep_ratio=False, backend="pillow"),
    dict(type="ScoreAtInputSize"),
    dict(type="PackSegInputs"),
]
# VOC trainaug / val folders, workers and the test sampler: _base_/voc_data.py.
train_dataloader = dict(
    batch_size=60,  # per process; the lr is scaled by the total batch (auto_scale_lr)
    drop_last=True,
    sampler=dict(type="DefaultSampler", shuffle=True),
    dataset=dict(pipeline=train_pipeline),
)
test_dataloader = dict(batch_size=8, dataset=dict(pipeline=test_pipeline))

train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=25)
optim_wrapper = dict(
    type="OptimWrapper", optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4)
)
auto_scale_lr = dict(enable=True, base_batch_size=60)  # lr = 0.01 * total batch / 60
param_scheduler = [dict(type="MultiStepLR", by_epoch=True, milestones=[20], gamma=0.1)]
log_processor = dict(by_epoch=True)
