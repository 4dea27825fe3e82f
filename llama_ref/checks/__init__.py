"""Checks of the model against the outside world, each a module with a ``main(argv)`` that a script in
``scripts/`` runs (and ``python -m llama_ref.checks.<name>`` too):

* :mod:`.compare_hf`: logits of ours against ``transformers`` on the same weights (``scripts/compare_hf.py``);
* :mod:`.load_check`: load a full-size checkpoint, one forward, load time and peak RSS (``scripts/load_7b_check.py``);
* :mod:`.tp_check`: a tensor-parallel forward under ``torchrun`` against one process (``scripts/tp_check.py``).

Nothing is imported here: ``transformers`` and ``torch.distributed`` are needed only by the check that uses them.
"""
