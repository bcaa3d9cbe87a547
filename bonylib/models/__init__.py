"""Models, layer 2: networks and what it takes to use one as a frozen encoder.

timm backbones read as named outputs (``backbones``: pooled feature and patch tokens), the wavelet stems
(``stems``), the DINO head and the multi-crop wrapper (``head``), the export of a trained teacher
(``export``), the encoder contract (``encoders``: model, eval transform, width, tokens, precision, identity),
the loaders of every encoder the benchmarks compare (``loaders``) and the one way a text names one
(``registry``), and the measured cost of ViT and XCiT attention (``attention_cost``).
"""
