"""Fine-tuning stage: LoRA / QLoRA / full fine-tuning of a base model through peft (`lmforge finetune`)."""
