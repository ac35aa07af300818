# DINO with the same budget as the DenseDINO demo (same backbone, views and schedule).
_base_ = ["./densedino_vit-t_demo.py"]

model = dict(
    method=dict(
        _delete_=True,
        type="DINO",
        arch="vit_tiny",
        patch_size=8,
        out_dim=2048,
        head=dict(hidden_dim=512, bottleneck_dim=128),
        drop_path_rate=0.0,
        cls_pairs="all",
        backbone=dict(img_size=48, depth=4),
    )
)
