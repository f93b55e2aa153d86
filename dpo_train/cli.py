"""The command line: parse, load the config, train."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .config import describe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Direct Preference Optimization for Hugging Face causal LMs.")


# "\b" tells click to keep the following lines as they are instead of re-wrapping them.
# "\b" tells click to keep the following lines as they are instead of re-wrapping them.
@app.command(epilog="Exit codes: 0 done; 1 unexpected error; 2 config, data, model or checkpoint error (one "
             "line); 75 stopped by SIGTERM/SIGINT after saving a checkpoint; 130 aborted by a second Ctrl-C."
             "\n\nConfig keys (type, default); README.md says what each does:\n\n\b\n" + describe())
def main(
    config: Path = typer.Option(..., "--config", "-c", help="YAML file with sections model, data, loss, train."),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...",
        help="Dotted overrides of config values, typed like the field they replace: "
             "train.max_steps=20 loss.beta=0.2 data.eval=null"),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="'auto': continue from the newest complete checkpoint in train.output_dir "
                               "(or start fresh if there is none); or the path of a checkpoint."),
    force_resume: bool = typer.Option(
        False, "--force-resume", help="Resume even if the config differs from the checkpoint's in keys "
                                      "that change the training math."),
) -> None:
    """Train a policy with DPO on preference pairs (prompt, chosen, rejected).

    Writes {train.output_dir}/config.yaml (the resolved config), metrics.jsonl (one JSON
    object per logged step; eval metrics prefixed eval/), eval_results.json, checkpoints/
    (every train.save_every steps) and final/ (the policy and tokenizer in Hugging Face format).
    """
    from .checkpoint import CheckpointError, Stopped
    from .config import ConfigError, load_config
    from .data import DataError
    from .models import ModelError

    try:
        cfg = load_config(config, overrides or [])
        from .trainer import train  # imported late: torch and transformers take seconds to import
        train(cfg, resume=resume, force_resume=force_resume)
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except Stopped as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(75)  # EX_TEMPFAIL: a scheduler may requeue the job with --resume auto
    except KeyboardInterrupt:
        typer.echo("aborted by a second Ctrl-C; nothing saved since the last checkpoint", err=True)
        raise typer.Exit(130)
