# The Leopart probe sized for the built-in data (densedino-data: 128 px images, background + 10
# shapes) on 2 CPU cores: 128 px crops, labels at 29 x 29 (100/448 of the crop, as 100 for 448),
# 4 epochs with the x0.1 step at epoch 3 (20 of 25), batch 16. About 400 iterations instead of
# Leopart's ~4,400, so the lr is 30x Leopart's: 0.3 * batch / 60 (0.08 at batch 16). The classes
# come from the data's meta.json (densedino-eval seg fills them in).
_base_ = ["./leopart_linear_voc.py"]

data_root = "work_dirs/demo/data/VOCdevkit/VOC2012"
crop_size = (128, 128)
train_size = (29, 29)

model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(in_channels=192, num_classes=11, train_size=train_size),
)
# Leopart's pipelines at this crop size: the base file's steps with new sizes (`_base_.NAME`
# reads a variable of the base file, mmengine's Python-config syntax).
train_pipeline = [
    dict(step, size=crop_size) if step.type == "PairedRandomResizedCrop" else step
    for step in _base_.train_pipeline
]
test_pipeline = [
    dict(step, scale=crop_size) if step.type == "Resize" else step for step in _base_.test_pipeline
]
train_dataloader = dict(
    batch_size=16,
    num_workers=2,
    dataset=dict(data_root=data_root, pipeline=train_pipeline),
)
test_dataloader = dict(
    batch_size=16,
    num_workers=2,
    dataset=dict(data_root=data_root, pipeline=test_pipeline),
)
train_cfg = dict(max_epochs=4)
optim_wrapper = dict(optimizer=dict(lr=0.3))
param_scheduler = [dict(type="MultiStepLR", by_epoch=True, milestones=[3], gamma=0.1)]
default_hooks = dict(logger=dict(interval=20))
