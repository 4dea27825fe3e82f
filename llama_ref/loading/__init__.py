"""Loading real Llama checkpoints: Hugging Face (safetensors or ``.bin``, sharded or not) and Meta
(``consolidated.NN.pth``, merged across model-parallel shards).

Files are memory-mapped (privately, copy-on-write) into a model built on the meta device: weights
stored in the target dtype are used as they are mapped (zero copy), the others are copied once
(see :mod:`.materialize`), so peak memory is the copied weights only.
"""

from .api import load_pretrained, parse_dtype
from .detect import FORMATS, HF_BIN, HF_SAFETENSORS, META, detect_format, find_checkpoint_files
from .errors import CheckpointError, NonFiniteWeightError
from .meta_files import META_KNOWN_EXTRAS, meta_split_dim

__all__ = [
    "CheckpointError", "FORMATS", "HF_BIN", "HF_SAFETENSORS", "META", "META_KNOWN_EXTRAS", "NonFiniteWeightError",
    "detect_format", "find_checkpoint_files", "load_pretrained", "meta_split_dim", "parse_dtype",
]
