"""Data sets: what ``--data`` names, read into normalised tensors with fixed splits.

``spec`` (what the user asked for and the per-source defaults), ``dataset`` (the splits and
their batches), ``loading`` (``load_dataset``: one entry point for every source), one module per
source (``digits``, ``cifar10``, ``imagefolder``), and the code they share: ``splits`` (fixed,
stratified hold-outs), ``cache`` (decoded images kept on disk) and ``fingerprint`` (the stable
hash of what was loaded).

Subpackages import nothing here: import from the module that defines a name.
"""
