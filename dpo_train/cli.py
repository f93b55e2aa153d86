"""The command line: parse, then hand over to a module. Training is the default command, so
`dpo-train --config X` trains, as does `dpo-train train --config X`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from .config import describe
from .exits import EXIT_CODES, KEPT_UNTIL_EXIT, LAUNCHED, RANK, exit_if_launched, fail, from_a_collective, user_errors

# "\b" tells click to keep the following lines as they are instead of re-wrapping them.
CONFIG_KEYS = "Config keys, with type, default and meaning (docs/configuration.md says the same):\n\n\b\n" + describe()


class TrainByDefault(TyperGroup):
    """Arguments that start with an option (`--config`) or an override (`key=value`) are training
    arguments; a bare word is left to click, which names a mistyped command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in ctx.help_option_names and (args[0].startswith("-") or "=" in args[0]):
            args = ["train", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=TrainByDefault, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode=None, epilog=EXIT_CODES + "\n\n" + CONFIG_KEYS,
    help="Direct Preference Optimization for Hugging Face causal LMs.\n\n\b\n"
         "Train (the default command):\n"
         "  dpo-train --config CONFIG.yaml [KEY=VALUE]... [--resume auto|PATH] [--force-resume]\n"
         "Write the quickstart's config and data into a directory, to run it from there:\n"
         "  dpo-train init [DIR]\n"
         "On-policy pairs (sample, judge, pair), and rounds of them with DPO (docs/on-policy.md):\n"
         "  dpo-train generate --config CONFIG.yaml [KEY=VALUE]...\n"
         "  dpo-train rounds --config CONFIG.yaml [KEY=VALUE]... [--force-resume]\n"
         "Check the data without training, plot a run, evaluate a trained model:\n"
         "  dpo-train check-data --config CONFIG.yaml [KEY=VALUE]...\n"
         "  dpo-train plot RUN_DIR\n"
         "  dpo-train eval --model RUN_DIR [--data PATH]    or    dpo-train eval --model DIR --ref DIR --data PATH")

CONFIG = typer.Option(..., "--config", "-c", help="YAML file with sections model, data, loss, train.")
OVERRIDES = typer.Argument(None, metavar="[KEY=VALUE]...",
                           help="Dotted overrides of config values, typed like the field they replace: "
                                "train.max_steps=20 loss.beta=0.2 data.eval=null")


@app.command(epilog=EXIT_CODES + "\n\n" + CONFIG_KEYS)
def train(
    config: Path = CONFIG,
    overrides: Optional[List[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="'auto': continue from the newest complete checkpoint in train.output_dir "
                               "(or start fresh if there is none); or the path of a checkpoint."),
    force_resume: bool = typer.Option(
        False, "--force-resume", help="Resume even if the config differs from the checkpoint's in keys "
                                      "that change the training math."),
) -> None:
    """Train a policy with DPO on preference pairs (prompt, chosen, rejected). The default command.

    Writes {train.output_dir}/config.yaml (the resolved config), metrics.jsonl (one JSON
    object per logged step; eval metrics prefixed eval/), eval_results.json, checkpoints/
    (every train.save_every steps) and final/ (the policy and tokenizer in Hugging Face format).
    """
    from .config import load_config
    from .hub import EXIT_CODE as HUB_EXIT_CODE, HubError
    from .signals import StopSignals, Stopped  # the standard library only: installed before torch loads

    with StopSignals():  # a first SIGTERM or Ctrl-C from here on stops the run as signals.py's table says
        try:
            cfg = load_config(config, overrides or [])
            from .trainer import train as run_training  # imported late: torch and transformers take seconds
            run_training(cfg, resume=resume, force_resume=force_resume)
            exit_if_launched()
        except Stopped as e:  # first: matching user_errors() imports modules, which a signal may have cut short
            if RANK == 0:
                typer.echo(str(e), err=True)
            raise typer.Exit(e.exit_code)  # 75, EX_TEMPFAIL: a scheduler may requeue the job with --resume auto
        except user_errors() as e:
            fail(e)
        except HubError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(HUB_EXIT_CODE)  # the run is complete locally: not a failure to retrain for
        except KeyboardInterrupt as e:  # a second Ctrl-C; its message says what the phase it cut short loses
            typer.echo(str(e) or "aborted by a second Ctrl-C", err=True)
            raise typer.Exit(130)
        except RuntimeError as e:
            if not (LAUNCHED and from_a_collective(e)):
                raise
            typer.echo(f"\n[rank {RANK}] stopped: another process failed, so a collective did not complete "
                       f"({str(e).splitlines()[0][:160]})", err=True)
            raise typer.Exit(1)
        finally:  # a launched process gets here only when it failed: exit_if_launched does not return
            KEPT_UNTIL_EXIT.clear()


@app.command()
def init(directory: Path = typer.Argument(Path("."), metavar="[DIR]", help="Where to write them (created if "
                                                                         "needed); default: here.")) -> None:
    """Write the quickstart's files into DIR: configs/quickstart.yaml, its data (data/capitals/), and the
    Accelerate config of every engine (configs/accelerate/), as a checkout of dpo-train holds them; then
    `dpo-train --config configs/quickstart.yaml` runs the quickstart from DIR. Nothing is overwritten."""
    from .quickstart import InitError, write_demo

    try:
        written = write_demo(directory)
    except InitError as e:
        fail(e)
    typer.echo(f"wrote {len(written)} files into {directory}:\n" + "\n".join(f"  {path}" for path in written))
    typer.echo(f"\nTrain the quickstart:  {'' if directory == Path('.') else f'cd {directory} && '}"
               "dpo-train --config configs/quickstart.yaml")


@app.command("check-data", epilog=CONFIG_KEYS)
def check_data(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Load, check and tokenize the config's data as training would, without loading the model or
    training. Prints, per file: rows kept and dropped (and why), truncated prompts and completions,
    token-length percentiles of prompt, chosen and rejected, and the first pair as the model sees it,
    the masked prompt tokens marked."""
    from .config import load_config

    try:
        cfg = load_config(config, overrides or [])
        from .data_report import check_data as report
        typer.echo(report(cfg))
    except user_errors() as e:
        fail(e)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run's train.output_dir (or its metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the PNG; default RUN_DIR/metrics.png."),
) -> None:
    """Plot loss, reward margin and reward accuracy over optimizer steps, train and eval, from
    RUN_DIR/metrics.jsonl into one PNG. Works on a run still in progress. Needs matplotlib
    (pip install matplotlib)."""
    from .plots import PlotError, plot_run

    try:
        path, summary = plot_run(run_dir, out)
    except PlotError as e:
        fail(e)
    typer.echo(f"wrote {path} ({summary})")


@app.command("eval")
def evaluate(
    model: str = typer.Option(..., "--model", help="The trained model: a run directory (its final/ is loaded and "
                                                   "its config.yaml read), a Hugging Face directory, hub id or "
                                                   ".gguf file; its tokenizer is used."),
    ref: Optional[str] = typer.Option(None, "--ref", help="The frozen reference it is compared with (usually the "
                                                          "model training started from); default: the run's."),
    data: Optional[str] = typer.Option(None, "--data", help="Preference pairs: .jsonl/.json/.parquet file, dataset "
                                                            "directory or hub id; rows with an `answer` get "
                                                            "exact-answer accuracy. Default: the run's eval data."),
    split: Optional[str] = typer.Option(None, help="Split of a dataset directory or hub dataset (slices too: "
                                                   "test[:500]); default: the run's, else test."),
    loss_type: Optional[str] = typer.Option(None, "--loss-type", help="One loss type of docs/losses.md (sigmoid, "
                                                                      "ipo, ...); default: the run's (its whole "
                                                                      "loss section), else sigmoid."),
    beta: Optional[float] = typer.Option(None, help="The beta of the rewards, beta * (log model - log ref); "
                                                    "default: the run's, else 0.1."),
    max_length: Optional[int] = typer.Option(None, min=2, help="Tokens per sequence, prompt + one completion; "
                                                               "default: the run's, else 512."),
    max_prompt_length: Optional[int] = typer.Option(None, min=1, help="Prompt tokens kept (cut from the left); "
                                                                      "default: the run's, else 256."),
    batch_size: int = typer.Option(4, min=1, help="Pairs per forward pass."),
    max_new_tokens: int = typer.Option(32, min=0, help="Greedy tokens per generation; 0 generates nothing."),
    examples: int = typer.Option(3, min=0, help="Prompts whose generations are shown."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON to this file "
                                                                  "(its folder is created); '-' prints JSON instead "
                                                                  "of the table."),
) -> None:
    """Compare a trained model with its reference on preference pairs: reward accuracy and margin,
    log-prob accuracy and loss, exact-answer accuracy when rows carry an `answer`, and greedy
    generations of both for the first few prompts. Given a run directory, its config.yaml supplies
    the reference, eval data, loss and lengths that options do not. Prints a table; --json writes
    the same as JSON."""
    import json
    import typing

    from .config import LossType

    for bad, why in ((beta is not None and beta <= 0, f"--beta must be > 0, got {beta}"),
                     (loss_type is not None and loss_type not in typing.get_args(LossType),
                      f"--loss-type must be one of {', '.join(typing.get_args(LossType))}, got {loss_type}"),
                     (dtype not in ("float32", "bfloat16", "float16"), f"--dtype must be float32, bfloat16 or float16, got {dtype}")):
        if bad:
            fail(why)
    try:
        from .evaluate import eval_settings, evaluate_models, format_report
        settings = eval_settings(model, ref, data, split, loss_type, beta, max_length, max_prompt_length)
        if settings.max_prompt_length >= settings.max_length:
            fail(f"--max-prompt-length ({settings.max_prompt_length}) must be < --max-length ({settings.max_length}) "
                 "so every completion keeps a token")
        result = evaluate_models(settings, batch_size, max_new_tokens, examples, dtype)
    except user_errors() as e:
        fail(e)
    if json_path and str(json_path) == "-":
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(format_report(result))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        typer.echo(f"\nwrote {json_path}")


@app.command(epilog=CONFIG_KEYS)
def generate(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Sample generate.num_samples completions per prompt of data.train from model.name_or_path, score them
    with generate.judge, and write best-against-worst pairs that `dpo-train` trains on as they are to
    generate.output (default {train.output_dir}/pairs.jsonl), with NAME.generation.yaml beside it: the
    settings, counts and completions/s. Under a launcher each process samples its share. See docs/on-policy.md."""
    from .config import load_config

    try:
        cfg = load_config(config, overrides or [])
        from .generate import generate_pairs
        generate_pairs(cfg)
    except user_errors() as e:
        fail(e)
    except KeyboardInterrupt:  # the pairs file is written aside and renamed: nothing half-written is left
        typer.echo("aborted by Ctrl-C; no pairs file written", err=True)
        raise typer.Exit(130)
    exit_if_launched()


@app.command(epilog=CONFIG_KEYS)
def rounds(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
           force_resume: bool = typer.Option(False, "--force-resume", help="Continue although the config differs "
                                                                           "from the one the rounds started with.")) -> None:
    """rounds.count rounds of: sample pairs from the current policy (as `generate` does), DPO-train it on them
    (as `train` does), each round in {train.output_dir}/round-N/. The same command continues after an
    interruption (SIGKILL too) with the results of an uninterrupted run. See docs/on-policy.md."""
    from .config import load_config
    from .rounds import PhaseFailed, run_rounds
    from .signals import Stopped

    try:
        run_rounds(load_config(config, overrides or []), force=force_resume)
    except user_errors() as e:
        fail(e)
    except PhaseFailed as e:  # a launched phase failed; its own message is above
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    except Stopped as e:
        typer.echo(f"{str(e).split('; continue')[0]}; continue with the same dpo-train rounds command", err=True)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("aborted by a second Ctrl-C; run the same command again to continue", err=True)
        raise typer.Exit(130)
