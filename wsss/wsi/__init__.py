"""Whole-slide images: readers (OpenSlide or tifffile), the tissue mask, the tiled segmentation run
(``wsss predict-wsi``) and QuPath GeoJSON export."""
