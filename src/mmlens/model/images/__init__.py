"""Image geometry: where each image token comes from in the image (`layout`: segments, cells,
spans), the per-pixel map that paints token predictions back onto the image whatever the layout
kind (`pixel_map`), and how a label mask follows the processor's resize, crop and pad
(`preprocess`)."""
