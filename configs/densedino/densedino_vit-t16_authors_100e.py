# The authors' released recipe (yyk-wew/DenseDINO README): ViT-Tiny/16, 2 teacher views + 4 more
# views, all 224 px with crop scale (0.25, 1), CLS loss on the 2 global pairs only, reference
# loss on all pairs, 100 epochs, batch 64 x 8 GPUs.
# Points: their `--num_reference 2` draws 2 random points per pair (`sampling_reference_point`
# in main_dino.py draws `num_reference` points in random mode; only grid mode uses k x k, and the
# flag's help text "Use k*k points in actual" is wrong). The preset has `num_points=2`.
_base_ = ["./densedino_vit-s16_4x224_300e.py"]

model = dict(method=dict(arch="vit_tiny", cls_pairs="global", ref_pairs="all"))
train_dataloader = dict(batch_size=64, dataset=dict(views=dict(_delete_=True, preset="authors")))
train_cfg = dict(max_epochs=100)
