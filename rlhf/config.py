"""
Every setting of the RLHF layer, one per line: python -m rlhf (the pipeline) and python -m
rlhf.heads (its head study). Override any key on the command line: `python -m rlhf --seeds=5`.
Both programs read the first section (rlhf/study.py: SHARED_KEYS), and config.py's data, device,
dtype, seed, attn_impl and kv_cache. The head_* keys are the head study's; the rest, the
pipeline's.
"""

# --- both programs: the base, the task, evaluation, RL -------------------------------------------
rlhf_base = "model_dict/shipped/gpt_.pt"  # the pretrained model every stage starts from
rlhf_script: "gpt_ | gpt" = "gpt_"  # gpt_: SM-GPT, samples with a KV cache; gpt: LB-GPT
# auto: sentiment, or none with --pairs; sentiment: a lexicon (half scores, half judges) and AFINN;
# verse: ten syllables a line; dialogue: speakers' turns; module:function: your own, text -> float
oracle: "auto | sentiment | verse | dialogue | module:function | none" = "auto"
prompt_tokens: "[1, 2**20]" = 16  # prompt length: train-split windows (evaluation: val split)
completion_tokens: "[1, 2**20]" = 32  # completion length (sampled at temperature 1)
eval_prompts: "[2, 2**20]" = 64  # prompts every method (best-of-n too) is evaluated on
eval_split: "test | dev" = "test"  # test: the val split's second half; dev: its first half
dpo_beta: "> 0" = 0.1  # DPO: strength of the pull towards the reference (picked on the dev split)
# the KL to the base in the reward (RLOO: per sequence; PPO: per token), per unit of the reward
# model's score, which is standardised on base samples (so it means the same in every seed)
rl_beta: ">= 0" = 0.3
grpo_beta: ">= 0" = 0.04  # GRPO: weight of the KL to the base (k3, per token) in the loss
rloo_lr: "> 0" = 1e-3  # RLOO: AdamW learning rate (picked on the dev split: --rlhf_stage=tune)
rl_prompts: "[1, 2**20]" = 8  # train-split prompts per step
rl_group: "[2, 2**20]" = 8  # samples per prompt (RLOO: each baselined by the mean of the others)
rl_normalize = False  # RLOO: divide advantages by their group's std
max_grad_norm: "> 0" = 1.0  # DPO family, RLOO, PPO: clip the gradient norm (lr decays to 0)
quick = False  # a smaller, faster run: the values in QUICK below (outputs: rlhf_<oracle>_quick_*)

# --- the pipeline: pairs, reward model, best-of-n, DPO -------------------------------------------
# all: every stage for each seed, then the report; label: label pairs of the base yourself
# tune: pick each method's settings on the dev split (not part of all)
rlhf_stage: ("all | pairs | rm | bon | dpo | rloo | ppo | grpo | eval | report | tune | "
             "label") = "all"
pairs = ""  # a JSON-lines file of prompt/chosen/rejected texts to tune on instead of the oracle's
pairs_held_out: "(0, 1)" = 0.1  # with --pairs: the share of its prompts held out
labels = "data/labels.jsonl"  # --rlhf_stage=label: where your answers go (ties, skips: beside it)
label_target: ">= 1" = 200  # --rlhf_stage=label: how many pairs to label
seeds: "[1, 1000]" = 1  # replicates: seed, seed + 1, ... (means and 95% intervals over them)
label_agreement: "(0.5, 1)" = 0.75  # how often noisy labels agree with the oracle (sets tau)
# pairs sampled from train-split prompts (and n_pairs / 8 held out); ties (equal oracle scores)
# are left out, not labelled
n_pairs: "[16, 2**24]" = 8192
rm_epochs: "[1, 2**20]" = 1  # reward model: passes over the pairs
rm_batch: "[1, 2**20]" = 64  # reward model: pairs per step
rm_lr: "> 0" = 1e-3  # reward model: AdamW learning rate
bon_max_n: "[2, 2**20]" = 512  # best-of-n for n = 1, 2, 4, ... up to this (512: about 5.2 nats)
# completions per evaluation prompt and checkpoint (at least 2: the reward model is checked on
# pairs of them)
eval_samples: "[2, 2**20]" = 4
kl_targets = "2,4"  # the KLs (nats per sequence) at which the report compares the methods
# the comparisons named before any run (at most six), each method@KL: the method minus best-of-n at
# that KL on the first held-out judge (with no judge: the measure). Holm's correction is over
# these alone; every other difference the report gives is exploratory
primary = "dpo@2,rloo@2,grpo@2,dpo@4,rloo@4,grpo@4"
# a reading at a KL only from kept policies at most max_bracket x the KL apart; each run keeps its
# policy where its KL first crosses every target x (1 - max_bracket / 4) and x (1 + max_bracket/4)
max_bracket: "(0, 2]" = 1.0
# the DPO family, each from the base on all the reward model's pairs: dpo (hard labels), cdpo
# (labels smoothed by cdpo_epsilon), ipo (IPO on per-token mean log-probabilities), preferred_ft
# (fine-tuning on the chosen side)
dpo_methods = "dpo"
cdpo_epsilon: "(0, 0.5)" = 0.1  # cDPO: the chance a label is flipped (TRL's label_smoothing)
dpo_epochs: "[1, 2**20]" = 1  # DPO family: passes over the pairs
dpo_batch: "[1, 2**20]" = 32  # DPO family: pairs per step
# each method's learning rate (AdamW) and strength (beta; IPO: tau), picked on the dev split by
# python -m rlhf --rlhf_stage=tune (generate_text/shipped/rlhf_sentiment_seed1337_tuning.json)
dpo_lr: "> 0" = 3e-4  # (dpo_beta: above; the head study reads it too)
cdpo_lr: "> 0" = 3e-4
cdpo_beta: "> 0" = 0.05
ipo_lr: "> 0" = 3e-4
ipo_tau: "> 0" = 0.5
preferred_ft_lr: "> 0" = 1e-4
ppo_lr: "> 0" = 1e-3
# where the frontier at a KL (the best setting there on the dev split) is not the method's keys
# above: that setting, trained as a run of its own (named method@KL) that gives the method's
# reading at that KL alone; entries method@KL:key=value:key=value, comma-separated (tune prints
# them)
settings_at_kl = "dpo@2:dpo_lr=0.0003:dpo_beta=0.2,rloo@2:rloo_lr=0.0003,ppo@2:ppo_lr=0.0003"
# --rlhf_stage=tune: the grids (learning rates of the DPO family and of the RL methods; beta of the
# sigmoid DPO losses; IPO's tau; cDPO's epsilon), each setting measured on tune_prompts dev prompts
dpo_lr_grid = "1e-4,3e-4,1e-3"
rl_lr_grid = "1e-4,3e-4,1e-3"
beta_grid = "0.05,0.1,0.2"
tau_grid = "0.25,0.5,2"
epsilon_grid = "0.05,0.1,0.2"  # cDPO's epsilon
tune_prompts: "[2, 2**20]" = 32

# --- the pipeline: RLOO and PPO ------------------------------------------------------------------
rl_steps: "[1, 2**20]" = 40  # rollouts (RLOO: an optimizer step each; PPO: epochs x minibatches)
ppo_epochs: "[1, 2**20]" = 2  # PPO: passes over each step's rollouts
ppo_minibatches: "[1, 2**20]" = 4  # PPO: minibatches per pass
ppo_clip: "> 0" = 0.2  # PPO: clip the probability ratio to [1 - clip, 1 + clip]
ppo_value_clip: "> 0" = 0.2  # PPO: clip the value model's change from rollout time to this
ppo_value_lr: "> 0" = 3e-4  # PPO: AdamW learning rate of the value model
ppo_gamma: "[0, 1]" = 1.0  # PPO: discount along the completion (GAE)
ppo_lambda: "[0, 1]" = 0.95  # PPO: GAE's lambda
# GRPO (TRL's GRPOTrainer): the score's advantage within its prompt's group, updated as PPO's
# (ppo_epochs, ppo_minibatches, ppo_clip), the KL to the base in the loss rather than the reward
grpo_lr: "> 0" = 1e-4  # GRPO: AdamW learning rate
grpo_scale: "group | none" = "group"  # group: advantages / the group's std; none: Dr. GRPO

# --- the head study (rlhf/heads.py) --------------------------------------------------------------
head_batches: "[1, 2**20]" = 8  # val batches for the attention statistics and map divergence
head_batch_size: "[1, 2**20]" = 12  # sequences per val batch
head_prompts: "[1, 2**20]" = 64  # val prompts sampled for each head switched off or transplanted
head_pairs: "[1, 2**20]" = 128  # held-out pairs for the implicit reward margins
head_tuning_steps: "[2, 2**20]" = 20  # RLOO steps tuning one part (kept at half and at the end)

# --quick: fewer pairs, prompts and steps (keys typed on the command line still win)
QUICK = dict(n_pairs=1024, bon_max_n=64, eval_prompts=32, eval_samples=2, rl_steps=16)
