"""Linear segmentation probe on Pascal VOC (`densedino-eval seg`), on mmsegmentation.

Importing this package stays light (no mmseg); the modules that register into mmseg's
registries are ``backbone`` (``FrozenViTBackbone``), ``head`` (``LinearProbeHead``), ``dataset``
(``VOCLayoutDataset``, ``PairedRandomResizedCrop``, ``ScoreAtInputSize``) and ``metric``
(``ProbeIoUMetric``); the configs in ``configs/seg/`` import them with ``custom_imports``.
"""
