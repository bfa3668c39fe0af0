"""The out-of-the-box demo of kernelrl: a toy alignment task small enough to run SFT, a
reward model, PPO, DPO and best-of-N on a CPU in minutes, with its shipped data.

``kernelrl.demo.task`` defines the task (vocabulary, tokenizer, the hidden gold rule, the
tiny model's config, paths of the shipped data); ``kernelrl.demo.make_data`` regenerates
the shipped data in ``kernelrl/demo/data`` byte for byte; ``kernelrl.demo.pipeline`` is
``kernelrl demo`` (also ``python -m kernelrl.demo``), the whole pipeline on this task.
"""

from kernelrl.demo.task import (build_tokenizer, data_path, gold_score, model_config,
                                save_tokenizer, score_responses, win_rate)

__all__ = ["build_tokenizer", "data_path", "gold_score", "model_config", "save_tokenizer",
           "score_responses", "win_rate"]
