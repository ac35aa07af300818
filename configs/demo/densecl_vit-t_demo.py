# DenseCL with the DINO demo's backbone, data and schedule: two 48 px views (the query and the
# key; no further views), 6 x 6 locations per view. The queues hold 1,024 keys instead of 65,536
# so that real keys replace the random initial ones within an epoch of the demo data, and the
# key encoder follows with momentum 0.99 (MoCo's 0.999 is meant for ~100k iterations).
_base_ = ["./dino_vit-t_demo.py"]

model = dict(
    method=dict(
        _delete_=True,
        type="DenseCL",
        arch="vit_tiny",
        patch_size=8,
        feat_dim=128,
        hidden_dim=512,
        queue_len=1024,
        temperature=0.2,
        loss_lambda=0.5,
        global_feature="cls",
        drop_path_rate=0.0,
        backbone=dict(img_size=48, depth=4),
    )
)
train_dataloader = dict(dataset=dict(views=dict(num_local=0)))
schedule = dict(momentum=0.99, momentum_end=0.99)
