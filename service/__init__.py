"""FoldServe inference service (never imports torch)."""
