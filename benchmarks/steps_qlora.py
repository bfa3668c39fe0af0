"""The QLoRA cases of the steps family (bench_steps.py, cases ``sft_qlora`` and
``dpo_qlora``): the SFT and DPO LoRA steps of bench_steps.py over a 4-bit NF4 base, kernelrl's
QLoRA against bitsandbytes + PEFT (and TRL on that model).

Shapes: those of ``sft_lora`` / ``dpo_lora`` (bench_steps.py) but the MLP width I rounded up
to a multiple of 64, NF4's block size (light 344 -> 384, full 688 -> 704): bitsandbytes
0.50's CPU dequantize is wrong when a weight's in_features is not a multiple of its block
size (blocks that straddle rows), so down_proj (in_features I) must not be. LoRA r=16
alpha=16 on q,k,v,o,gate,up,down, as every LoRA row; the 4-bit layers are those same seven
(every linear but lm_head), NF4, blocks of 64, double quantization, compute in the model's
dtype (fp32).

The rows (the step functions are bench_steps.py's; only the model differs):

  kernelrl  the trainers' step, the model set up by ``make_trainable(model, lora_r=16,
            qlora=True, ...)`` (the trainers' --qlora: ``kernelrl.models.quantize_model``,
            then the adapters: ``NF4LoRALinear``, whose forward and backward are one fused
            dequant-matmul ``kernelrl.ops.nf4_linear`` with the LoRA branch in it).
  bnb_peft  the eager step (full logits, log_softmax, gather; the DPO reference under
            PEFT's disable_adapter()) on what a bitsandbytes QLoRA user builds: the same
            Llama saved to a temporary folder and loaded by ``from_pretrained`` with
            ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)`` (its
            linears become ``bitsandbytes.nn.Linear4bit``), then
            ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)``
            (the QLoRA recipe's call; here it only freezes the base: every weight is fp32
            already and the family runs without gradient checkpointing), then
            ``get_peft_model`` with the family's LoRA config (PEFT's bitsandbytes LoRA
            layer). It is the reference of the check.
  trl       TRL's SFTTrainer / DPOTrainer step (bench_steps.py's TRL row) given that
            quantized model (not yet PEFT-wrapped) and the LoRA config. One deviation: TRL
            casts the adapters of a quantized model to bf16 (the QLoRA paper's advice); the
            row casts them back to fp32 before anything runs, so that it takes the same fp32
            step as the others and passes the same check (with bf16 adapters, the adapters
            after one step differ from bnb_peft's by 70% of the update at the light shape,
            A's bf16 rounding mostly; the check allows 0.1%). What is timed is then TRL's
            step code over PEFT and bitsandbytes, as for the other TRL rows.

The same quantized weights in every row: bitsandbytes' CPU quantizer does not always round
the 8-bit double-quantized absmax codes to nearest (0.1% to 1.35% of the blocks differ from
kernelrl's, which does; enough to fail the check: the adapters after one step then differ
by 0.6% to 2.7% of the update, light and full model), so after loading, each Linear4bit's
weight is replaced by kernelrl's quantization of the same weight (``NF4Linear.from_linear``,
what ``quantize_model`` runs per layer, on the same device), handed over through the state
dict kernelrl writes under bitsandbytes' names (``Params4bit.from_prequantized``). The NF4
bytes are bitsandbytes' own anyway, so both sides dequantize to exactly the same Ŵ. The
model's other weights (embeddings, norms, lm_head) are copied out of the loaded file's
memory map, so that paging them in is not counted in the step's memory.

Check (bench_steps.py's, against bnb_peft): one step from the same start, the same loss
(|diff| <= 1e-4 + 1e-5·|loss|) and the adapters afterwards within 0.1% of bnb_peft's
update. flops: the LoRA count of bench_steps.py (the dequantization is not counted).
"""

from __future__ import annotations

import cases
import steps_common as sc

NF4_BLOCK = 64
REF = "bnb_peft"
cases.LEGEND.setdefault(REF, "bitsandbytes Linear4bit + PEFT LoRA")


def fit(shape: dict) -> dict:
    """``shape`` with I rounded up to a multiple of the NF4 block (H must be one already)."""
    if shape["H"] % NF4_BLOCK:
        raise ValueError(f"shape {shape}: QLoRA needs H a multiple of {NF4_BLOCK}")
    return dict(shape, I=-(-shape["I"] // NF4_BLOCK) * NF4_BLOCK)


def skip() -> str | None:
    """Why the bitsandbytes rows cannot run here, or None."""
    return sc.missing("bitsandbytes", "peft")


def bnb_model(shape: dict, device: str):
    """steps_common's Llama loaded in 4 bits by transformers + bitsandbytes, its Linear4bit
    weights then set to kernelrl's NF4 quantization of the same weights (module docstring);
    no adapters yet."""
    import tempfile

    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit
    from kernelrl.nn import NF4Linear
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    source = sc.llama(shape, device)     # quantized on the device, as the kernelrl row is
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="kernelrl-bench-qlora-") as folder:
        source.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype=torch.float32,
            device_map={"": device})
        for p in model.parameters():          # out of the file's memory map
            if not isinstance(p, Params4bit):
                p.data = p.data.clone()
    quantized = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            state = NF4Linear.from_linear(source.get_submodule(name)).qweight.to_state_dict()
            data = state.pop("weight")
            module.weight = Params4bit.from_prequantized(data, state, device=device,
                                                         module=module)
            quantized += 1
    want = shape["L"] * len(sc.LORA_TARGETS)
    if quantized != want:
        raise RuntimeError(f"transformers loaded {quantized} Linear4bit layers, expected "
                           f"{want} (the LoRA targets of every layer)")
    return model


def bnb_peft(shape: dict, device: str):
    """The bnb_peft row's model: bnb_model, prepare_model_for_kbit_training, PEFT's LoRA,
    the family's initial adapters."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(bnb_model(shape, device),
                                            use_gradient_checkpointing=False)
    model = sc.peft_lora(model)
    sc.init_adapters(model)
    return model


def adapters_fp32(model) -> None:
    """Cast the trainable (adapter) weights back to fp32 after TRL made them bf16."""
    import torch
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()

