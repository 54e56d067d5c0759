"""
The RLHF layer: preference tuning of the models gpt.py and gpt_.py train. It is built on the core
(dualgpt/), which never imports it. Extra dependencies: rlhf/requirements.txt.

    python -m rlhf             # the pipeline, stage by stage (__main__.py)
    python -m rlhf.heads       # its head study: which heads did tuning change? (heads.py)

Its files, in reading order:

    __main__.py         the pipeline: pairs, reward model, best-of-n, DPO family, RL, report
    heads.py            the head study, run after the pipeline
    config.py           the keys of both programs, one per line
    oracles.py          programmatic labellers: the oracle score and the held-out judges
    preference.py       the math: labels, log-probabilities and KL, the reward model, DPO, RLOO,
                        PPO, GRPO, best-of-n (each proven against a closed form or a plain
                        computation)
    pairs.py            preference pairs as text (prompt/chosen/rejected JSON lines), checked
    study.py            what both programs share: the config, the setup, records of what produced
                        each file, seeds drawn by name, policies, prompts, completions and scores
    training.py         every training loop: the reward model, the DPO family, RLOO, PPO, GRPO
    report.py           measuring tuned policies; the report's tables and samples
    labelling.py        --rlhf_stage=label: pairs labelled by hand in the terminal, one key each
    head_comparison.py  two models head by head: weight change, attention divergence, transplants
    plots.py            the RLHF figures
"""
