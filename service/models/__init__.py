"""Models: the repository scan, the served versions and what each owns.

A version is validated, its ONNX Runtime sessions opened, its batcher started, and
it is swapped in; a bare user ``model.onnx`` gets its folded twin derived here.
"""
