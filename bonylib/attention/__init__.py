"""What an encoder looks at: attention maps of timm ViT and XCiT encoders, and maps stitched over slides.

- :mod:`bonylib.attention.maps`: the maps of one forward pass, taken with forward hooks (ViT: the CLS
  token's attention over the patches in every block; XCiT: its class-attention blocks' CLS maps, the
  per-head norm of each token's XCA output, and the channel x channel XCA matrices);
- :mod:`bonylib.attention.heatmaps`: per-tile values (a map, a class, PCA colours of the embeddings)
  stitched over a slide thumbnail at the tiles' coordinates, with memory bounded by the thumbnail;
- :mod:`bonylib.attention.command`: ``bony attention``, which writes the maps as ``.npy`` and PNG.

Figures are drawn by :mod:`bonylib.plotting`; everything here returns plain arrays.
"""
