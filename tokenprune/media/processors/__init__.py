"""Torchvision-free video preprocessors, one module per family layout.

transformers' video processors refuse to build without torchvision (which tokenprune does not
install: its PyPI wheel is CUDA-linked and breaks the PIL image processors on CPU). These do the
same resize, normalisation and patch layout with plain torch, and plug into the Hugging Face
processor as its ``video_processor``, so the processor itself still writes the placeholder text,
Qwen3-VL's timestamps and ``mm_token_type_ids``. Where torchvision is installed, transformers' own
video processors are used unchanged.
"""
