"""LoRA adapters through peft (defaults: r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down)."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from retriever.config import ConfigError, LoraConfig


def apply_lora(model: PreTrainedModel, settings: LoraConfig) -> PeftModel:
    """Wrap `model` with fresh, trainable LoRA adapters; base weights are frozen."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in settings.target_modules if target not in present]
    if missing:
        raise ConfigError(
            f"LoRA target modules {missing} do not exist in {type(model).__name__}; "
            f"set backbone.lora.target_modules to names among its linear layers"
        )
    config = PeftLoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """Attach a saved adapter; `trainable=True` continues training it (e.g. after MNTP)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a LoRA adapter directory (adapter_config.json missing)")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def base_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The underlying transformers model (LoRA layers stay injected in it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
