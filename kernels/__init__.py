"""Custom kernels of the training pipeline (Triton FlashAttention-2).

IMPORTANT: this package is named ``kernels``, which is also the name of Hugging Face's optional
``kernels`` package. While ``transformers`` is imported it probes ``import kernels``. Therefore this
``__init__`` must import nothing from ``transformers`` (or from ``pipeline``) and must never define
``__version__``. Registration with transformers lives in :mod:`kernels.transformers_attention`,
which callers import explicitly.

Nothing heavy is imported here either: importing :mod:`kernels.flash_attention` decorates Triton
kernels, and ``TRITON_INTERPRET`` must be set before that happens on machines without a GPU.
"""

# No __all__ either: `from kernels import *` must not pull in triton or transformers.
