"""attnrec's offline half: data, training, evaluation, ONNX export and index building.

Importing this package is cheap: torch is imported only by the modules that train or export.
"""
