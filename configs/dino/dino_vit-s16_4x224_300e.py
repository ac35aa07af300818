# DINO under the DenseDINO paper's budget (its baseline): ViT-S/16, 4 views of 224 px, 300 epochs.
_base_ = ["./dino_vit-s16_multicrop_100e.py"]

train_dataloader = dict(dataset=dict(views=dict(_delete_=True, preset="paper")))
train_cfg = dict(max_epochs=300)
