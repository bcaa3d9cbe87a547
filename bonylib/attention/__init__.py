"""What an encoder looks at, a stage (layer 3): it imports neither ``ssl`` nor ``evaluation``.

- :mod:`bonylib.attention.maps`: the maps of one forward pass, taken with forward hooks (ViT: the CLS
  token's attention over the patches in every block; XCiT: its class-attention blocks' CLS maps, the
  per-head norm of each token's XCA output, and the channel x channel XCA matrices);
- :mod:`bonylib.attention.command`: ``bony attention``, which writes the maps of images, folders and slides
  as ``.npy`` arrays, with a JSON of what was computed and, unless ``figures=false``, PNGs;
- :mod:`bonylib.attention.figures`: those PNGs and the chapter's figures, drawn from the arrays with
  :mod:`bonylib.plotting`. Slide maps are stitched with :mod:`bonylib.data.heatmaps`.
"""
