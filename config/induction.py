# A laptop recipe in which induction heads form (docs/heads.md): python gpt.py config/induction.py
# Two layers, as in the induction-head papers, and half of the training windows repeat their first
# p tokens (p varies), so that copying from context pays from the first steps (val text is left as
# it is).
n_layer = 2
n_head = 4
n_embd = 128
block_size = 128
vocab_size = 512
dropout = 0.0
batch_size = 32
learning_rate = 3e-3
min_lr = 3e-4
repeat_fraction = 0.5
max_minutes = 5.0
eval_points = 16
eval_iters = 10
log_probe = True  # in-context learning and each head's probe scores at each evaluation
