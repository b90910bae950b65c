"""FoldServe training side: data, BN model zoo, training, folding and ONNX export (needs torch)."""
