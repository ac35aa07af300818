# DINO's standard recipe: ViT-S/16, 2 global 224 px + 8 local 96 px views, 100 epochs.
_base_ = ["../_base_/default_runtime.py", "../_base_/datasets/imagenet_ssl.py"]

model = dict(
    type="SSLModel",
    method=dict(type="DINO", arch="vit_small", patch_size=16, out_dim=65536, drop_path_rate=0.1),
    clip_grad=3.0,
    freeze_last_layer=1,
)
train_dataloader = dict(dataset=dict(views=dict(preset="dino", num_local=8)))
train_cfg = dict(max_epochs=100)
