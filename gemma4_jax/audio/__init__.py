"""The Gemma 4 audio tower (E2B, E4B): audio loading, features and encoder.

`features.load_audio` reads a clip as 16 kHz mono, `features.batch_clips`
pads clips into a batch, `encoder.AudioEncoder` turns the batch into soft
tokens, and `encoder.project_audio_soft_tokens` maps those into the text
embedding space.
"""
