"""
Every hyperparameter of gpt.py (LB-GPT) and gpt_.py (SM-GPT), one per line. Edit freely.
Any key can also be set on the command line: `python gpt.py --n_layer=6 --dropout=0.1`.

The model/training defaults are tuned for a laptop CPU (2 cores here): `python gpt.py` trains for a
5-minute budget and writes recognisably Shakespeare-like text. A sweep on Tiny Shakespeare (README,
"Time to quality") found that, for minutes of CPU time, many small steps (block 64, batch 12) beat fewer
large ones, a large BPE vocabulary (8192) beats smaller ones, and dropout is needed beyond about a minute.
A GPU can afford the lecture scale, so with `preset = "auto"` the values in GPU_PRESET replace these on
CUDA (command-line overrides still win; set `preset = "none"` to use exactly the values here).
"""

# --- data -----------------------------------------------------------------------------------
data = "data/input.txt"  # training text (UTF-8); also a local path, or an http(s) URL to download
data_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"  # where data/input.txt comes from
data_sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # checked after downloading data_url

# --- tokenizer ------------------------------------------------------------------------------
vocab_size = 8192  # BPE vocabulary (>= 256); a RegexTokenizer is trained on `data` and cached in tokenizers/

# --- model ----------------------------------------------------------------------------------
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # embedding width; must be divisible by n_head
block_size = 64  # context length in tokens
dropout = 0.1  # dropout probability, in [0, 1)
bias = False  # biases in Linear layers and LayerNorms

# --- training -------------------------------------------------------------------------------
batch_size = 12  # sequences per micro-batch
grad_accum_steps = 1  # micro-batches per optimizer step
max_iters = 5000  # optimizer steps (used when max_minutes is 0)
max_minutes = 5.0  # train for this many minutes instead (evaluation time excluded); the LR schedule follows the clock
learning_rate = 2e-3  # peak learning rate
min_lr = 2e-4  # learning rate at the end of the cosine decay
warmup_iters = 100  # linear warm-up steps
lr_decay_iters = 5000  # step at which the cosine decay reaches min_lr (usually max_iters)
weight_decay = 0.1  # AdamW weight decay, applied to weight matrices only
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
grad_clip = 1.0  # clip the gradient norm to this (0 = off)
eval_interval = 500  # evaluate and checkpoint every this many steps
eval_iters = 50  # batches per split in each evaluation
log_interval = 10  # steps between progress-bar updates of the loss (each update syncs the device)
seed = 1337  # seeds weights, batches, dropout and sampling

# --- system ---------------------------------------------------------------------------------
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16 (auto: bfloat16 autocast where the GPU or CPU has native bf16, else float32)
compile = "auto"  # torch.compile: true | false | auto (on for time budgets >= 2 min, or CUDA runs >= 1000 steps)
preset = "auto"  # auto: use GPU_PRESET on CUDA | none: always the values in this file

# --- fused attention (gpt_.py only) -----------------------------------------------------
attn_impl = "sdpa"  # sdpa: torch's scaled_dot_product_attention | matmul: the explicit textbook form
kv_cache = True  # sample with a key/value cache

# --- sampling -------------------------------------------------------------------------------
prompt = ""  # text to continue, or FILE:path; empty starts from a newline
num_samples = 2  # samples to generate
max_new_tokens = 300  # tokens per sample
temperature = 0.8  # 0 = greedy
top_k = 200  # keep only the k most likely tokens (0 = off)
top_p = 1.0  # nucleus sampling: keep the smallest set with this much probability (1 = off)

# --- head-level research -------------------------------------------------------------------
head_mask = ""  # heads to switch off, as layer.head from 0: "0.3,2.1"; applies in every mode of both scripts
heads_per_layer = False  # --mode=heads: also write one attention-map PNG per layer

# --- paths and mode -------------------------------------------------------------------------
ckpt = ""  # checkpoint file; empty = model_dict/<script>.pt
sample_file = ""  # where samples are written; empty = generate_text/<script>.txt
resume = False  # continue training from ckpt
overwrite = False  # let a fresh `train` replace an existing ckpt (the old one is kept as <ckpt>.bak)
mode = "auto"  # auto (train if no ckpt, then sample) | train | sample | eval | heads (attention maps, head stats, ablation)

# The lecture scale, used on CUDA when preset = "auto".
GPU_PRESET = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64, max_iters=5000, max_minutes=0.0,
                  lr_decay_iters=5000, learning_rate=1e-3, min_lr=1e-4, eval_interval=500, eval_iters=200)
