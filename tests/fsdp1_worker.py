"""Wrap a PeftCausalLM's model with FSDP1 (one CPU process, gloo) and print which adapter keys a checkpoint keeps.

Lightning's `FSDPStrategy` refuses CPUs, but torch's FSDP1 itself runs there: this exercises the naming that
matters — wrapped parameter names carry `_fsdp_wrapped_module.`, Lightning's full state dict does not.
Usage: python fsdp1_worker.py MODEL_DIR  → JSON {"kept": [...], "values_equal": bool}
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from lightning_peft import PeftCausalLM
from lightning_peft.strategies import FSDP1


def main(model_dir: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("gloo", rank=0, world_size=1)
    module = PeftCausalLM(model_name_or_path=model_dir, adapter={"r": 4, "init_lora_weights": False})
    module.configure_model()
    reference = {k: v.clone() for k, v in module.model.state_dict().items() if "lora_" in k}
    # As Lightning's FSDPStrategy does: the LightningModule is the root, each decoder layer its own unit.
    wrapped = FSDP(
        module,
        auto_wrap_policy=FSDP1().wrap_policy(module.model),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )
    wrapped({"input_ids": torch.tensor([[1, 2, 3]])})  # FSDP1 initializes lazily on the first forward
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True)):
        checkpoint = {"state_dict": wrapped.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    equal = set(kept) == set(reference) and all(torch.equal(kept[k], reference[k]) for k in reference)
    print(json.dumps({"kept": sorted(kept), "expected": sorted(reference), "values_equal": equal}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
