"""Decoding a batch of stored entries: the host batch, the transfer and unpack, the eager and fused (Triton)
decodes, CUDA graphs, the mapped fetch and the decode runtime with its serving settings."""
