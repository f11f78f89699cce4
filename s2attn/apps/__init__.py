"""The applications built on the library: the ``s2attn`` command (:mod:`.cli`, its shared options in
:mod:`.options`), training (:mod:`.train`) and its synthetic data (:mod:`.data`), the needle-retrieval
grid (:mod:`.needle`) and the GPU benchmark (:mod:`.bench`).

The library never imports this package (``tests/test_layering.py`` checks it); these modules may
import optional dependencies (``transformers``, ``tqdm``, ``matplotlib``) that the library does not need.
"""
