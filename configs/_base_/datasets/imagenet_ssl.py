# ImageNet train folder (train/<class>/*.JPEG) or any image tree; labels are not used.
train_dataloader = dict(
    batch_size=64,  # per GPU
    num_workers=10,
    persistent_workers=True,
    pin_memory=True,
    drop_last=True,
    sampler=dict(type="EpochSampler", shuffle=True),
    collate_fn=dict(type="ssl_collate"),
    dataset=dict(type="SSLImageDataset", root="data/imagenet/train", views=dict(preset="dino")),
)
