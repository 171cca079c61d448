"""The RLHF stages and what they share; each writes a finished stage directory the next one reads.

    base.py       the stage config base, the optimizer loop, devices, model/tokenizer, rows, StageResult
    config.py     typed configs from YAML sections and key=value overrides
    data.py       dataset rows: loading, validation, chat formatting, tokenizing, batching
    io.py         stage directories (written aside, marked COMPLETE, renamed into place); input models
    demo_data.py  the embedded demo: corpus, tokenizer, tiny model, gold judge
    sft.py  reward.py  dpo.py  ppo.py     the stages (each imports base/config/data/io, never another stage)
    pipeline.py   SFT -> RM -> PPO on one config, with the demo's gold tracking; report.py its report

Imports point one way: cli -> stages -> trainer -> models/algos -> ops. Nothing here is imported
by ``import rlhf_fast``; the public names (``SFTConfig``, ``train_sft``, ...) load on first use.
"""
