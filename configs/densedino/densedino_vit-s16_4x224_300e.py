# The paper's main setting: ViT-S/16, 4 views of 224 px, 4 reference points per pair,
# alpha = 0.5, 300 epochs (k-NN 69.7, VOC linear mIoU 63.3 in the paper).
_base_ = ["../_base_/default_runtime.py", "../_base_/datasets/imagenet_ssl.py"]

model = dict(
    type="SSLModel",
    method=dict(
        type="DenseDINO",
        arch="vit_small",
        patch_size=16,
        out_dim=65536,
        drop_path_rate=0.1,
        alpha=0.5,
        cls_pairs="all",
        ref_pairs="all",
    ),
    clip_grad=3.0,
    freeze_last_layer=1,
)
train_dataloader = dict(dataset=dict(views=dict(preset="paper", num_points=4)))
train_cfg = dict(max_epochs=300)
