"""The command line: parse, load the config, train."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Direct Preference Optimization for Hugging Face causal LMs.")


@app.command()
def main(
    config: Path = typer.Option(..., "--config", "-c", help="YAML file with sections model, data, loss, train."),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...",
        help="Dotted overrides of config values, typed like the field they replace: "
             "train.max_steps=20 loss.beta=0.2 data.eval=null"),
) -> None:
    """Train a policy with DPO on preference pairs (prompt, chosen, rejected).

    Writes {train.output_dir}/config.yaml (the resolved config), metrics.jsonl (one JSON
    object per logged step; eval metrics prefixed eval/), eval_results.json, and final/
    (the policy and tokenizer in Hugging Face format).
    """
    from .config import ConfigError, load_config
    from .data import DataError
    from .models import ModelError

    try:
        cfg = load_config(config, overrides or [])
        from .trainer import train  # imported late: torch and transformers take seconds to import
        train(cfg)
    except (ConfigError, DataError, ModelError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
