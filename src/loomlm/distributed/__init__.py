"""Tensor parallelism over torch.distributed (Shoeybi et al. 2019, Megatron-LM; vLLM's layout).

Rank 0 is the engine: scheduler, sampler, detokenizer and the rank-0 shard of the model. Ranks
1..N-1 are workers that hold their shard and run the forward pass of each step that rank 0
broadcasts (`worker.py`). The weights are cut by `tensor_parallel.py`: column-parallel QKV and
gate/up projections (each rank its heads and its slice of the MLP), row-parallel output and down
projections summed by an all-reduce, a vocabulary-parallel embedding and LM head, and each rank a
KV pool for its own heads.
"""
