"""Pruning stage: make a model smaller by removing weights, optionally recovering quality by a short
fine-tune through the pretraining loop.

config.py      PruneConfig (method, sparsity, structured options, quality data, recovery run)
magnitude.py   global unstructured magnitude pruning (zeros in place; matrices keep their shapes)
structured.py  MLP channels and attention kv-groups removed: the matrices shrink, the result is a
               smaller Hugging Face Llama model
quality.py     held-out next-token loss on token shards (the quality figure in the report)
stage.py       prune(config) -> PruneResult: load, measure, prune, save, recover, measure, report
"""

from lmforge.components.prune.config import PruneConfig
from lmforge.components.prune.stage import PruneResult, prune

__all__ = ["PruneConfig", "PruneResult", "prune"]
