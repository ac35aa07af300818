# SelfPatch (alinlab/SelfPatch README): DINO + patch loss on ViT-S/16, 2 global 224 px views
# (scale 0.25-1) + 8 local 96 px views (scale 0.05-0.25), 4096 patch prototypes, k = 4
# neighbours, L = L_dino + 0.1 L_patch, batch 128 per GPU on 8 GPUs, 100 epochs.
_base_ = ["../_base_/default_runtime.py", "../_base_/datasets/imagenet_ssl.py"]

model = dict(
    type="SSLModel",
    method=dict(
        type="SelfPatch",
        arch="vit_small",
        patch_size=16,
        out_dim=65536,
        patch_out_dim=4096,
        num_neighbours=4,
        patch_weight=0.1,
        border="wrap",  # the authors' window wraps around the grid
        image_token="cls",  # "query": the authors' head exactly (backbone CLS then untrained)
        drop_path_rate=0.1,
        cls_pairs="all",
    ),
    clip_grad=3.0,
    freeze_last_layer=1,
)
train_dataloader = dict(
    batch_size=128,
    dataset=dict(
        views=dict(preset="dino", num_local=8, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
    ),
)
train_cfg = dict(max_epochs=100)
