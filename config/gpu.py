# The lecture's scale for one GPU: python gpt.py config/gpu.py (keys typed after it still win).
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
batch_size = 64
max_iters = 5000
max_minutes = 0.0
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 500
eval_iters = 200
