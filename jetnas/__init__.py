"""jetnas: PostNAS (Jet-Nemotron, arXiv 2508.15884) for anyone's pretrained model.

Turn a full-attention transformer into a hybrid of a few full-attention / sliding-window layers and linear-attention
JetBlocks, then train, evaluate and serve it fast. Importing jetnas runs nothing heavy; see `jetnas.layers` for the
block zoo and `jetnas.ops` for the kernels.
"""

__version__ = "0.1.0"

# registers the `jet_nemotron` model type with transformers' Auto classes
from jetnas import models as _models  # noqa: E402,F401
