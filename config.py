"""
Every setting of gpt.py (LB-GPT) and gpt_.py (SM-GPT), one per line. Edit freely, or override a
key on the command line: `python gpt.py --n_layer=6 --dropout=0.1`. A config file named on the
command line sets several at once, as in nanoGPT: `python gpt.py config/gpu.py` (typed keys win).

The defaults suit a laptop CPU: `python gpt.py` trains for 5 minutes and writes recognisably
Shakespeare-like text. For minutes of CPU time, many small steps (block 64, batch 12) and a large
BPE vocabulary train best; config/gpu.py is the lecture's scale for one GPU.

A key's annotation is the one declaration of the values it takes, a range ("[0, 1)": 0 included,
1 not; ">= 1") or choices ("sdpa | matmul"): anything else is refused, in one line, before any
work starts. Numbers must be finite.
"""

# --- data ----------------------------------------------------------------------------------------
data = "data/input.txt"  # training text (UTF-8), or a folder of .txt files: Tiny Shakespeare here
data_workers: "[0, 1024]" = 0  # processes that encode the text into token ids; 0: one per core
tokenizer_sample_mb: "[1, 2**20]" = 20  # a larger corpus trains its tokenizer on this much of it

# --- system --------------------------------------------------------------------------------------
device: "auto | cpu | cuda | cuda:N | mps" = "auto"
dtype: "auto | float32 | bfloat16 | float16" = "auto"  # auto: bfloat16 where the chip is native
seed: "[0, 2**63)" = 1337  # seeds weights, batches, dropout and sampling
compile = False  # torch.compile the model (15-60 s up front; can pay back on long runs)

# --- tokenizer -----------------------------------------------------------------------------------
vocab_size: "[256, 2**20]" = 8192  # BPE vocabulary, trained on `data`, cached in tokenizers/

# --- model ---------------------------------------------------------------------------------------
n_layer: "[1, 1024]" = 4  # transformer blocks
n_head: "[1, 1024]" = 4  # attention heads per block
n_embd: "[1, 2**16]" = 128  # embedding width, divisible by n_head
block_size: "[1, 2**20]" = 64  # context length in tokens
dropout: "[0, 1)" = 0.1  # dropout probability
bias = False  # biases in Linear layers and LayerNorms

# --- training ------------------------------------------------------------------------------------
batch_size: "[1, 2**20]" = 12  # sequences per micro-batch (also of --mode=eval and heads)
grad_accum_steps: "[1, 2**20]" = 1  # micro-batches per optimizer step
# Training stops at the first limit in force (0 = none of that kind). A limit you set (typed, or
# in a config file) is obeyed and the other, unless set too, is off: --max_iters=3000 trains 3000.
max_iters: ">= 0" = 0  # stop after this many optimizer steps
max_minutes: ">= 0" = 5.0  # stop after this many minutes of training (evaluation excluded)
learning_rate: "> 0" = 2e-3  # peak learning rate
min_lr: ">= 0" = 2e-4  # learning rate at the end of the cosine decay
warmup_iters: ">= 0" = 100  # linear warm-up steps
lr_decay_iters: ">= 0" = 0  # step where the cosine decay reaches min_lr; 0 = the end of the run
weight_decay: ">= 0" = 0.1  # AdamW weight decay, on weight matrices only
beta1: "[0, 1)" = 0.9  # AdamW beta1
beta2: "[0, 1)" = 0.99  # AdamW beta2
# muon: torch.optim.Muon on the blocks' weight matrices (lr muon_lr), AdamW on the rest
optimizer: "adamw | muon" = "adamw"
muon_lr: "> 0" = 0.01  # Muon's peak lr (torch scales it by sqrt(rows / cols) where rows > cols)
grad_clip: ">= 0" = 1.0  # clip the gradient norm to this (0 = off)
eval_interval: ">= 1" = 500  # evaluate and checkpoint every this many steps (step-limited runs)
# with a time budget: evaluate and checkpoint at this many evenly spaced points (and at the start)
eval_points: "[1, 2**20]" = 10
eval_iters: "[1, 2**20]" = 50  # batches per split in each evaluation (and --mode=heads)
# training windows that repeat their first p tokens to the end, p from a quarter to a half of the
# block (val is left as it is): in-context learning forms in minutes (config/induction.py)
repeat_fraction: "[0, 1]" = 0.0
log_interval: ">= 1" = 10  # steps between reads of the loss (bar, log, NaN check; each read syncs)

# --- SM-GPT's attention (gpt_.py) ----------------------------------------------------------------
attn_impl: "sdpa | matmul" = "sdpa"  # sdpa: torch's fused attention; matmul: the textbook form
kv_cache = True  # sample with a key/value cache

# --- sampling ------------------------------------------------------------------------------------
prompt = ""  # text to continue, or FILE:path; empty starts from a newline
num_samples: "[1, 2**20]" = 2  # samples to generate
max_new_tokens: "[0, 2**20]" = 300  # tokens per sample
temperature: ">= 0" = 0.8  # 0 = greedy
top_k: ">= 0" = 200  # keep only the k most likely tokens (0 = off)
top_p: "(0, 1]" = 1.0  # nucleus sampling: the smallest set with this probability (1 = off)
stop = ""  # end a sample before the first of these strings, |-separated ("\n\n|ROMEO:")

# --- head-level research -------------------------------------------------------------------------
head_mask = ""  # heads to switch off, as layer.head from 0: "0.3,2.1"; applies in every mode
heads_per_layer = False  # --mode=heads: also write one attention-map PNG per layer
# the probe of --mode=heads (and of training, with log_probe): sequences of one random token, then
# probe_length random tokens twice
log_probe = False  # each evaluation in training also logs in-context learning, probe scores
probe_sequences: "[1, 2**16]" = 64
probe_length: "[0, 2**16]" = 0  # tokens per copy; 0: 24, or what fits the window
# --mode=patch: prompts of equal token length, and the answers (one token each) whose logit
# difference at the last position is the metric; left empty, a task the model tells apart
patch_clean = ""
patch_corrupt = ""
patch_answers = ""  # correct|wrong, as " him| her"

# --- paths and mode ------------------------------------------------------------------------------
ckpt = ""  # checkpoint file; empty = model_dict/<script>.pt
export_to = ""  # --mode=export: the file (pt) or folder (hf) to write
export_format: "pt | hf" = "pt"  # pt: our checkpoint, weights only; hf: a Hugging Face folder
import_from = ""  # --mode=import: a Hugging Face GPT-2 folder (or hub name) to write as ckpt
sample_file = ""  # where samples are written; empty = generate_text/<script>.txt
resume = False  # continue training from ckpt
overwrite = False  # let a fresh `train` or `import` replace ckpt (the old one is kept as .bak)
# auto: train if there is no ckpt (or with --resume or --overwrite), then sample
mode: "auto | train | sample | eval | heads | patch | export | import" = "auto"
