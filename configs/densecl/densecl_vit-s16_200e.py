# DenseCL (WXinlong/DenseCL) on ViT-S/16: MoCo v2 query/key encoders (key momentum 0.999,
# constant), global + dense projections (2048 -> 128), queues of 65,536 negatives,
# temperature 0.2, L = 0.5 L_global + 0.5 L_dense; 2 views of 224 px (scale 0.2-1), batch
# 32 per GPU on 8 GPUs (256), 200 epochs.
# DenseCL's SGD recipe (lr 0.03, wd 1e-4) is for ResNets; a ViT gets AdamW with MoCo v3's
# ViT settings instead (lr 1.5e-4 per 256 images, 40 warm-up epochs, weight decay 0.1, cosine
# to 0). The views use the suite's photometric recipe (DINO's), not MoCo v2's.
_base_ = ["../_base_/default_runtime.py", "../_base_/datasets/imagenet_ssl.py"]

model = dict(
    type="SSLModel",
    method=dict(
        type="DenseCL",
        arch="vit_small",
        patch_size=16,
        feat_dim=128,
        hidden_dim=2048,
        queue_len=65536,
        temperature=0.2,
        loss_lambda=0.5,
        global_feature="cls",  # or "mean" (the mean patch token, ResNet's average pooling)
        drop_path_rate=0.0,
    ),
    clip_grad=None,  # MoCo and DenseCL do not clip gradients
    freeze_last_layer=0,  # no DINO head to freeze
)
train_dataloader = dict(
    batch_size=32,
    dataset=dict(
        views=dict(
            _delete_=True,
            num_global=2,
            num_local=0,
            global_size=224,
            global_scale=(0.2, 1.0),
            min_intersection_global=0.0,  # MoCo's two crops are independent
            num_points=1,  # reference points are not used
        )
    ),
)
train_cfg = dict(max_epochs=200)
schedule = dict(
    lr=1.5e-4,  # per base_batch_size (256) images, as the runtime's
    min_lr=0.0,
    warmup_epochs=40,
    weight_decay=0.1,
    weight_decay_end=0.1,
    momentum=0.999,
    momentum_end=0.999,
)
