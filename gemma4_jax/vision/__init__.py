"""The Gemma 4 vision tower: image preprocessing and the vision encoder.

`preprocess.preprocess_images` turns images into padded patches for one
soft-token budget. `encoder.VisionEncoder` turns those into soft tokens, and
`encoder.project_soft_tokens` maps them into the text embedding space.
"""
