# SelfPatch with the same budget as the DINO demo (same backbone, views and schedule): 6 x 6
# patches per 48 px view, k = 4 of the 8 wrapped neighbours, a patch head of 256 prototypes.
_base_ = ["./dino_vit-t_demo.py"]

model = dict(
    method=dict(
        _delete_=True,
        type="SelfPatch",
        arch="vit_tiny",
        patch_size=8,
        out_dim=2048,
        patch_out_dim=256,
        num_neighbours=4,
        patch_weight=0.1,
        border="wrap",
        image_token="cls",
        head=dict(hidden_dim=512, bottleneck_dim=128),
        drop_path_rate=0.0,
        cls_pairs="all",
        backbone=dict(img_size=48, depth=4),
    )
)
