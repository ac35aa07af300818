# Pascal VOC 2012 for the segmentation probes: train on trainaug (SegmentationClassAug), test on
# val (SegmentationClass). Each protocol adds its pipelines, batch sizes and train sampler, e.g.
# train_dataloader = dict(batch_size=..., sampler=..., dataset=dict(pipeline=train_pipeline)).
data_root = "data/VOCdevkit/VOC2012"

train_dataloader = dict(
    num_workers=8,
    persistent_workers=True,
    dataset=dict(
        type="PascalVOCDataset",
        data_root=data_root,
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClassAug"),
        ann_file="ImageSets/Segmentation/trainaug.txt",
    ),
)
test_dataloader = dict(
    num_workers=4,
    persistent_workers=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="PascalVOCDataset",
        data_root=data_root,
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        ann_file="ImageSets/Segmentation/val.txt",
    ),
)
