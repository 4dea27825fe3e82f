"""Loading real Llama checkpoints: Hugging Face (safetensors or ``.bin``, sharded or not) and Meta
(``consolidated.NN.pth``, merged across model-parallel shards).

Weights are read one tensor at a time from memory-mapped files into a model built on the meta
device, so peak memory is about one copy of the weights in the target dtype.
"""

from .api import load_pretrained, parse_dtype
from .detect import FORMATS, HF_BIN, HF_SAFETENSORS, META, detect_format, find_checkpoint_files
from .errors import CheckpointError, NonFiniteWeightError
from .meta_files import META_KNOWN_EXTRAS, meta_split_dim

__all__ = [
    "CheckpointError", "FORMATS", "HF_BIN", "HF_SAFETENSORS", "META", "META_KNOWN_EXTRAS", "NonFiniteWeightError",
    "detect_format", "find_checkpoint_files", "load_pretrained", "meta_split_dim", "parse_dtype",
]
