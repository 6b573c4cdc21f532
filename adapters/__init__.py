"""Bridges that plugins share: transformers VLMs to ``Encoder`` / ``ARBackbone``, diffusers autoencoders to
``Decoder``. A new VLM plugin is a page of code on top of these."""
