"""Builders for tests/train/test_ppo.py, in train_helpers' tiny vocabulary: a LoRA reward
model trained on the tiny model (so that PPO's four roles share one base), the roles of
a PPO run built as ``ppo.train`` builds them, and their memory: the bytes of the distinct
parameters the four roles hold, and (``python tests/train/ppo_helpers.py``) the peak RSS
of a rollout and an update in each layout, on a larger random Llama.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from rm_helpers import ranked_examples
from train_helpers import cli_args, write_jsonl


def train_lora_rm(model_dir, folder, *, lora_r: int = 4, full: bool = False) -> Path:
    """A reward model trained for 2 steps on ``model_dir`` into the run folder ``folder``:
    a LoRA one (adapter ``reward`` + head, ``adapter/``) or, with ``full``, a full
    fine-tune (``model/``)."""
    from kernelrl.train import rm

    folder = Path(folder)
    pairs = write_jsonl(folder.parent / f"{folder.name}-pairs.jsonl", ranked_examples(16, seed=2))
    settings = {"device": "cpu", "lora_r": 0 if full else lora_r, "lora_alpha": 8,
                "lr": 1e-2, "seed": 1}
    assert rm.main(cli_args(model_dir, pairs, folder, "--max-steps", 2, **settings)) == 0
    return folder


def build_roles(cfg):
    """(model, reward, reference, value lines) of a PPO run of ``cfg``, built as
    ``ppo.train`` builds them (on the CPU)."""
    from kernelrl.train import common, ppo, rl

    device = torch.device("cpu")
    tokenizer = common.load_run_tokenizer(cfg)
    policy = common.setup_model_from_config(cfg, device, adapter_name=ppo.POLICY_ADAPTER)
    reward, reward_line = rl.build_reward(
        reward_model=cfg.reward_model, reward_fn=cfg.reward_fn, policy=policy,
        tokenizer=tokenizer, model_path=cfg.model)
    value, value_line = ppo.build_value(cfg, policy, reward, device)
    model = rl.disable_dropout(ppo.PPOModel(policy, value)).train()
    reference, ref_line = rl.Reference.for_policy(policy, cfg, device)
    return model, reward, reference, (reward_line, ref_line, value_line)


def role_bytes(model, reward, reference) -> int:
    """Bytes of the distinct parameter storages the four roles hold (a shared tensor once)."""
    modules = [model, reference.model]
    if isinstance(getattr(reward, "model", None), torch.nn.Module):
        modules.append(reward.model)
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------------------
# Resident memory on a larger model (the module docstring's figure; run by hand:
# ``python tests/train/ppo_helpers.py FOLDER``)


def _rss_mb() -> float:
    """This process's resident set now, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _big_model(folder: Path) -> Path:
    """A random Llama, H = 512, 8 layers (about 25M parameters), with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train_helpers import VOCAB, make_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB["</s>"],
                         pad_token_id=VOCAB["<pad>"])
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _one_layout(root: Path, shared: bool) -> dict:
    """In this (fresh) process: the roles of one layout (shared: LoRA policy, LoRA reward
    model on its base; else full fine-tuning, four copies), their parameter MB and the
    resident MB they add; then the peak RSS of one PPO step."""
    from kernelrl.train import ppo

    cfg = ppo.PPOConfig(model=str(root / "model"), data=str(root / "prompts.jsonl"),
                        out=str(root / ("shared" if shared else "copies")), device="cpu",
                        max_steps=1, batch_size=8, max_new_tokens=32, num_ppo_epochs=1,
                        lora_r=4 if shared else 0, lora_alpha=8, save_every=0,
                        reward_model=str(root / ("rm-lora" if shared else "rm-full")))
    before = _rss_mb()
    model, reward, reference, _ = build_roles(cfg)
    held = {"param_mb": role_bytes(model, reward, reference) / 2**20,
            "roles_rss_mb": _rss_mb() - before}
    del model, reward, reference
    ppo.train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**held, "step_peak_rss_mb": peak, "baseline_rss_mb": before}


def main(root: str) -> None:
    root = Path(root)
    if len(sys.argv) > 2:                     # the child: one layout
        print(json.dumps(_one_layout(root, sys.argv[2] == "shared")))
        return
    from rl_helpers import prompt_rows

    model = _big_model(root / "model")
    write_jsonl(root / "prompts.jsonl", prompt_rows(8))
    train_lora_rm(model, root / "rm-lora")
    train_lora_rm(model, root / "rm-full", full=True)
    for layout in ("shared", "copies"):
        out = subprocess.run([sys.executable, __file__, str(root), layout], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(layout, out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    main(sys.argv[1])
