"""
Every setting of gpt.py (LB-GPT), gpt_.py (SM-GPT), rlhf.py (the RLHF pipeline) and rlhf_heads.py (its head
study), one per line. Edit freely. Any key can also be set on the command line of a program that reads it:
`python gpt.py --n_layer=6 --dropout=0.1`. Each heading names the programs that read the keys under it;
`python PROGRAM --help` lists that program's keys, and a key typed to a program that does not read it is an
error that names the programs that do.

The model/training defaults are tuned for a laptop CPU (2 cores here): `python gpt.py` trains for a
5-minute budget and writes recognisably Shakespeare-like text. A sweep on Tiny Shakespeare (README,
"Time to quality") found that, for minutes of CPU time, many small steps (block 64, batch 12) beat fewer
large ones, a large BPE vocabulary (8192) beats smaller ones, and dropout is needed beyond about a minute.
A GPU can afford the lecture scale, so with `preset = "auto"` the values in GPU_PRESET replace these on
CUDA (command-line overrides still win; set `preset = "none"` to use exactly the values here).
"""

# --- data (read by gpt.py, gpt_.py, rlhf.py, rlhf_heads.py) ----------------------------------
data = "data/input.txt"  # training text (UTF-8); also a local path, or an http(s) URL to download
data_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"  # where data/input.txt comes from
data_sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # checked after downloading data_url

# --- system (read by gpt.py, gpt_.py, rlhf.py, rlhf_heads.py) --------------------------------
device = "auto"  # auto | cpu | cuda | cuda:N | mps
dtype = "auto"  # auto | float32 | bfloat16 | float16 (auto: bfloat16 autocast where the GPU or CPU has native bf16, else float32)
seed = 1337  # seeds weights, batches, dropout and sampling; in RLHF every random draw, each by its name

# --- tokenizer (read by gpt.py, gpt_.py) -----------------------------------------------------
vocab_size = 8192  # BPE vocabulary (>= 256); a RegexTokenizer is trained on `data` and cached in tokenizers/

# --- model (read by gpt.py, gpt_.py) ---------------------------------------------------------
n_layer = 4  # transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # embedding width; must be divisible by n_head
block_size = 64  # context length in tokens
dropout = 0.1  # dropout probability, in [0, 1)
bias = False  # biases in Linear layers and LayerNorms

# --- training (read by gpt.py, gpt_.py) ------------------------------------------------------
batch_size = 12  # sequences per micro-batch (also the batch of --mode=eval and --mode=heads)
grad_accum_steps = 1  # micro-batches per optimizer step
# Training stops at the first limit in force (0 = no limit of that kind). A limit typed on the command line
# is obeyed, and one that only comes from this file never overrides it: `--max_iters=3000` trains for 3000
# steps even though max_minutes is set here. The learning rate ends fully decayed at whichever limit ends the run.
max_iters = 0  # stop after this many optimizer steps
max_minutes = 5.0  # stop after this many minutes of training (evaluation excluded, compiling included)
learning_rate = 2e-3  # peak learning rate
min_lr = 2e-4  # learning rate at the end of the cosine decay
warmup_iters = 100  # linear warm-up steps
lr_decay_iters = 0  # step at which the cosine decay reaches min_lr; 0 = at the end of the run
weight_decay = 0.1  # AdamW weight decay, applied to weight matrices only
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
grad_clip = 1.0  # clip the gradient norm to this (0 = off)
eval_interval = 500  # evaluate and checkpoint every this many steps (runs with only a step limit)
eval_points = 10  # with a time budget: evaluate and checkpoint at this many evenly spaced points of it
eval_iters = 50  # batches per split in each evaluation (also --mode=heads' val batches)
log_interval = 10  # steps between reads of the training loss: the progress bar, the JSON-lines log and the NaN check (each read syncs the device)
# auto compiles only where a measurement on this machine (python bench.py --only=compile records it in
# model_dict/compile_timings.json) says compiling gives at least 10% more steps within the run's limits
compile = "auto"  # torch.compile: true | false | auto
preset = "auto"  # auto | none (auto: GPU_PRESET below replaces these values on CUDA; none: always the values in this file)

# --- SM-GPT's attention (read by gpt_.py, rlhf.py, rlhf_heads.py) ----------------------------
# rlhf.py and rlhf_heads.py pass these on to the model when rlhf_script = gpt_
attn_impl = "sdpa"  # sdpa | matmul (sdpa: torch's scaled_dot_product_attention; matmul: the explicit textbook form)
kv_cache = True  # sample with a key/value cache

# --- sampling (read by gpt.py, gpt_.py) ------------------------------------------------------
prompt = ""  # text to continue, or FILE:path; empty starts from a newline (--mode=heads: the text of its attention maps)
num_samples = 2  # samples to generate
max_new_tokens = 300  # tokens per sample
temperature = 0.8  # 0 = greedy
top_k = 200  # keep only the k most likely tokens (0 = off)
top_p = 1.0  # nucleus sampling: keep the smallest set with this much probability (1 = off)
stop = ""  # end each sample before the first of these strings, separated by | (\n: a newline; "\n\n|ROMEO:" stops at a blank line or at Romeo's turn)

# --- head-level research (read by gpt.py, gpt_.py) -------------------------------------------
head_mask = ""  # heads to switch off, as layer.head from 0: "0.3,2.1"; applies in every mode of both scripts
heads_per_layer = False  # --mode=heads: also write one attention-map PNG per layer

# --- paths and mode (read by gpt.py, gpt_.py) ------------------------------------------------
ckpt = ""  # checkpoint file; empty = model_dict/<script>.pt
export_to = ""  # --mode=export: where to write a weights-only copy of ckpt (no optimizer state, half the size), or the folder of the Hugging Face export
export_format = "pt"  # pt | hf (pt: our checkpoint, weights only; hf: a Hugging Face GPT-2 folder that transformers and tokenizers load)
import_from = ""  # --mode=import: a Hugging Face GPT-2 folder (config.json, model.safetensors or pytorch_model.bin, tokenizer files) to write as ckpt
sample_file = ""  # where samples are written; empty = generate_text/<script>.txt
resume = False  # continue training from ckpt
overwrite = False  # let a fresh `train` replace an existing ckpt (the old one is kept as <ckpt>.bak)
mode = "auto"  # auto | train | sample | eval | heads | export | import (auto: train if there is no ckpt, or with --resume or --overwrite; then sample)

# --- RLHF: the base, the task, the evaluation prompts (read by rlhf.py, rlhf_heads.py) -------
rlhf_base = "model_dict/shipped/gpt_.pt"  # the pretrained model every stage starts from (either script's checkpoint)
rlhf_script = "gpt_"  # gpt_ | gpt (gpt_: SM-GPT, KV-cache sampling, faster; gpt: LB-GPT, one module per head)
oracle = "auto"  # auto | sentiment | verse | dialogue | module:function | none (auto: sentiment, or none with --pairs; sentiment: a lexicon, half scores, half judges, and AFINN judges; verse: ten syllables a line; dialogue: speakers' turns; module:function: your own, text -> float; none: measure with the reward model only)
prompt_tokens = 16  # prompt length: windows of the train split (evaluation: of the val split)
completion_tokens = 32  # completion length, sampled at temperature 1 with no top-k/top-p
eval_prompts = 128  # prompts every method is evaluated on (the head study uses the first head_prompts)
eval_split = "test"  # test | dev (test: windows of the val split's second half, for every reported number; dev: of its first half, for trying settings)
dpo_beta = 0.1  # DPO: strength of the pull towards the reference (the head study: the scale of its implicit reward margins)
quick = False  # a smaller, faster run: the values in RLHF_QUICK below; its outputs are named rlhf_<oracle>_quick_*

# --- RLHF: the study, pairs, reward model, best-of-n, DPO (read by rlhf.py) -------------------
rlhf_stage = "all"  # all | pairs | rm | bon | dpo | rloo | ppo | eval | report | label (all: every stage for each seed, then the report; label: you label pairs of the base's completions in the terminal)
pairs = ""  # a JSON-lines file of prompt/chosen/rejected texts (yours, or labelled with --rlhf_stage=label) to tune on instead of the oracle's pairs; a path from the current folder
pairs_held_out = 0.1  # with --pairs: the share of its pairs held out (the reward model's accuracy; their prompts evaluate every method)
labels = "data/labels.jsonl"  # --rlhf_stage=label: where your answers go, under the repository unless absolute (ties and skips: beside it, *_skipped.jsonl)
label_target = 200  # --rlhf_stage=label: how many pairs to label
seeds = 1  # replicates: seed, seed + 1, ... each runs every stage (its own pairs, reward model and policies); the report gives means and 95% intervals over them
label_agreement = 0.75  # how often the noisy labels agree with the oracle score, as with human raters (sets tau)
n_pairs = 8192  # preference pairs from train-split prompts (plus n_pairs / 8 held out, from dev prompts)
rm_epochs = 1  # reward model: passes over the pairs
rm_batch = 64  # reward model: pairs per step
rm_lr = 1e-3  # reward model: AdamW learning rate
bon_max_n = 1024  # best-of-n for n = 1, 2, 4, ... up to this (1024: about 5.9 nats)
bon_prompts = 24  # best-of-n on the first this many evaluation prompts (bon_max_n samples each)
eval_samples = 4  # completions per evaluation prompt, at the base, each kept checkpoint and the end
kl_targets = "1,2,4"  # the KLs (nats per sequence) at which the report compares the methods
keep_points = 5  # each tuning run keeps its policy at this many steps, each twice the one before, the last at the end (the curves at equal KL)
dpo_methods = "dpo,cdpo,ipo,dpo_soft"  # the DPO losses the dpo stage trains, each from the base (dpo: hard labels; cdpo: labels smoothed by cdpo_epsilon; ipo: IPO; dpo_soft: the pairs' preference probabilities, left out with --pairs)
cdpo_epsilon = 0.25  # conservative DPO: the chance a label is flipped (1 - label_agreement)
dpo_pairs = 3072  # DPO: train on the first this many pairs (0 = all); a time budget: the reward model learns from all n_pairs
dpo_lr = 3e-4  # DPO: AdamW learning rate (far above the 5e-7 used for 7B models: small models need it)
dpo_epochs = 1  # DPO: passes over the pairs
dpo_batch = 32  # DPO: pairs per step

# --- RL: RLOO and PPO (read by rlhf.py, rlhf_heads.py) ---------------------------------------
rl_beta = 0.05  # weight of the KL to the base in the reward (RLOO: of the sequence's; PPO: of each token's)
rl_lr = 3e-4  # AdamW learning rate
rl_prompts = 8  # train-split prompts per step
rl_group = 8  # samples per prompt (RLOO: each baselined by the mean of the others)
rl_normalize = False  # RLOO: divide advantages by their group's std (0 for a group of equal rewards)

# --- RL: the pipeline's runs (read by rlhf.py) -----------------------------------------------
rl_steps = 40  # RLOO and PPO: rollout steps (RLOO: one optimizer step each; PPO: ppo_epochs x ppo_minibatches)
ppo_epochs = 2  # PPO: passes over each step's rollouts
ppo_minibatches = 4  # PPO: minibatches per pass
ppo_clip = 0.2  # PPO: clip the probability ratio to [1 - clip, 1 + clip]
ppo_value_clip = 0.2  # PPO: clip the value model's change from its rollout-time values to this
ppo_value_lr = 3e-4  # PPO: AdamW learning rate of the value model
ppo_gamma = 1.0  # PPO: discount along the completion (GAE)
ppo_lambda = 0.95  # PPO: GAE's lambda

# --- the head study (read by rlhf_heads.py) --------------------------------------------------
head_batches = 8  # val batches for the attention statistics and map divergence
head_batch_size = 12  # sequences per val batch
head_prompts = 64  # val prompts sampled for each head switched off or transplanted
head_pairs = 128  # held-out pairs for the implicit reward margins
head_tuning_steps = 20  # RLOO steps tuning one head, attention only or the MLPs only (kept at half and at the end)

# The lecture scale, used on CUDA when preset = "auto".
GPU_PRESET = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64, max_iters=5000, max_minutes=0.0,
                  learning_rate=1e-3, min_lr=1e-4, eval_interval=500, eval_iters=200)

# --quick for rlhf.py and rlhf_heads.py: fewer pairs, prompts and steps (keys typed on the command line still win).
RLHF_QUICK = dict(n_pairs=1024, dpo_pairs=0, bon_max_n=64, bon_prompts=16, eval_prompts=48, eval_samples=2, rl_steps=16, keep_points=2,
                  dpo_methods="dpo,ipo")
