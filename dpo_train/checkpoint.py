"""Saving models: the final policy in Hugging Face format."""

from __future__ import annotations

from pathlib import Path


def save_final(accelerator, policy, tokenizer, directory: Path) -> None:
    """Write the policy and tokenizer so that `from_pretrained` loads them. Every process
    takes part (sharded engines gather the weights); only the main process writes."""
    state_dict = accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        accelerator.unwrap_model(policy).save_pretrained(directory, state_dict=state_dict,
                                                         safe_serialization=True)
        tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()
