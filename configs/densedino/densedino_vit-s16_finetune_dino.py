# Fine-tuning DenseDINO from DINO's released ViT-S/16 weights (the paper's and Leopart's start):
# student and teacher backbones from DINO's student and teacher, the CLS head from DINO's head and
# the reference head from the same DINO head (densedino/train/init_from.py; the log lists what was
# loaded and what stayed fresh). Get DINO's full checkpoint (backbones + heads) or its
# backbone-only file (then both heads start fresh) and point `model.init_from` at it:
#   --cfg-options model.init_from=PATH   or   model.init_from="dict(path=PATH,which=teacher)"
# Any format `load_backbone` reads works (DINO, the DenseDINO authors', ours, timm).
# Head shape = DINO's ViT-S/16 release: out_dim 65536, hidden 2048, bottleneck 256, and its last
# layer not weight-norm frozen (norm_last_layer False).
# The views, points and loss are the paper's main setting (base config). The schedule below is
# our choice for fine-tuning, not a published recipe: 50 epochs, a 2-epoch warm-up, and the
# teacher temperature DINO's head ended its own training with (0.07) from the first step.
_base_ = ["./densedino_vit-s16_4x224_300e.py"]

model = dict(
    init_from="checkpoints/dino_deitsmall16_pretrain_full_checkpoint.pth",
    method=dict(out_dim=65536, norm_last_layer=False),
)
train_cfg = dict(max_epochs=50)
schedule = dict(warmup_epochs=2, teacher_temp=0.07, warmup_teacher_temp=0.07)
