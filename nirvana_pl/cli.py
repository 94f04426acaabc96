"""``nirvana-pl``: the command line.

* ``nirvana-pl fit | validate | test`` - LightningCLI: a model, a datamodule and a Trainer from YAML
  recipes (``--config recipes/smollm2_pydoc.yaml``) and/or flags; add pruning to any LightningCLI
  config with ``--config callbacks/nirvana.yaml``.
* ``nirvana-pl prune`` - one-shot: load a model, score on calibration text, prune, save the folder.
* ``nirvana-pl eval`` - perplexity of a model folder on held-out text.
* ``nirvana-pl export`` - write a model folder as one GGUF file for llama.cpp (Ollama, LM Studio).

After ``fit`` the command prints where everything went (pruned model, reports, plot, metrics) and
writes ``run_summary.json`` next to the prune report.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

OVERVIEW = """\
usage: nirvana-pl {fit,validate,test,prune,eval,export} [options]

Structured pruning of transformers LLMs (NIRVANA) inside a Lightning fit.

commands:
  fit        train with a recipe or your own config; pruning happens inside the fit
             nirvana-pl fit --config recipes/smollm2_pydoc.yaml
  validate   run the validation loop of a config (e.g. held-out perplexity)
  test       run the test loop of a config
  prune      one-shot: score, prune and save a model folder (no training)
             nirvana-pl prune --model embedded:smollm2 --sparsity 0.3 --out runs/prune
  eval       perplexity of a model folder on held-out text
             nirvana-pl eval --model runs/prune/pruned_model
  export     write a model folder as one GGUF file that llama.cpp runs
             nirvana-pl export --model runs/prune/pruned_model --gguf pruned.gguf --dtype q8_0

Add pruning to an existing LightningCLI config:  --config callbacks/nirvana.yaml
`nirvana-pl COMMAND --help` lists the options of a command; `nirvana-pl fit --print_config` shows the
full configuration a recipe resolves to.
"""

TRAINER_COMMANDS = ("fit", "validate", "test")


# ----------------------------------------------------------------------------------------- LightningCLI
def _lightning_cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    from . import modules  # noqa: F401 - registers CausalLMModule & co. for short class names
    from . import datamodule  # noqa: F401

    enable_config_subclasses()
    # The Trainer's default logger is TensorBoard when it is installed and CSV otherwise (recipes leave
    # `trainer.logger` unset for that); Lightning announces the CSV fallback with a long notice.
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")

    class NirvanaCLI(LightningCLI):
        """LightningCLI with the nirvana-pl modules, readable errors and a closing summary after ``fit``."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: v for k, v in LightningCLI.subcommands().items() if k in TRAINER_COMMANDS}

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, FileNotFoundError, ImportError, AttributeError) as err:
                raise ConfigError(_instantiation_message(self, err)) from err

        def before_fit(self) -> None:
            self._started = time.perf_counter()

        def after_fit(self) -> None:
            from .distributed import run_directory

            log_dir = run_directory(self.trainer)  # a collective: every rank, before the rank-0 summary
            if self.trainer.is_global_zero:
                print(fit_summary(self.trainer, time.perf_counter() - self._started, log_dir), flush=True)

    return NirvanaCLI


def enable_config_subclasses() -> None:
    """Let configs give a subclass of the dataclass ``CalibrationSelector`` (e.g. ``TextCalibrationSelector``).

    Importing ``nirvana_pl.callback`` already does this (so a user's own LightningCLI reads
    ``callbacks/nirvana_functional_kl.yaml`` as it is); this function remains for explicit use.
    """
    from . import callback  # noqa: F401 - its import registers the setting


class ConfigError(ValueError):
    """A configuration value was rejected when the classes were built."""


def _instantiation_message(cli: Any, err: Exception) -> str:
    """The innermost error of a class that rejected its arguments, with the config key of that class."""
    chain, cur = [], err
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    root = chain[-1]
    owner = _raising_class(root)
    sub = cli.config.get("subcommand")
    cfg = cli.config.get(sub) if sub else cli.config
    key = None
    if owner is not None and cfg is not None:
        for name in ("model", "data", "trainer.logger"):
            value = cfg.get(name)
            if getattr(value, "class_path", None) == owner:
                key = name
        for i, cb in enumerate(cfg.get("trainer.callbacks") or []):
            if getattr(cb, "class_path", None) == owner:
                key = f"trainer.callbacks[{i}]"
        if key is None and owner.endswith(".Trainer"):
            key = "trainer"
    if key:
        where = f"{key} ({owner.rsplit('.', 1)[-1]})"
    else:
        where = owner.rsplit(".", 1)[-1] if owner else "the configuration"
    return f"{where}: {root}"


def _raising_class(err: BaseException) -> str | None:
    """Import path of the class whose ``__init__`` raised ``err`` (innermost such frame)."""
    tb, found = err.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            found = f"{cls.__module__}.{cls.__qualname__}"
            if not cls.__module__.startswith(("jsonargparse", "lightning.pytorch.cli")):
                break
        tb = tb.tb_next
    return found


def run_lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Build (and with ``run``, run) the LightningCLI of ``nirvana-pl fit|validate|test``."""
    cli_cls = _lightning_cli_class()
    argv0 = sys.argv
    if args is not None:
        sys.argv = sys.argv[:1]  # explicit args: LightningCLI must not also look at this process's argv
    try:
        return _build(cli_cls, args, run)
    finally:
        sys.argv = argv0


def _build(cli_cls: type, args: Sequence[str] | None, run: bool) -> Any:
    return cli_cls(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs=_parser_kwargs(),
        args=list(args) if args is not None else None,
        run=run,
    )


def _parser_kwargs() -> dict[str, Any]:
    # Errors are raised (not printed with the full usage) so that main() prints just the message.
    kwargs: dict[str, Any] = {"prog": "nirvana-pl", "exit_on_error": False, "allow_abbrev": False}
    for sub in TRAINER_COMMANDS:
        kwargs[sub] = {"exit_on_error": False, "allow_abbrev": False}
    return kwargs


def parse_recipe(path: str | Path, subcommand: str = "fit", overrides: Sequence[str] = ()) -> Any:
    """Parse (without building anything) a recipe as ``nirvana-pl SUBCOMMAND --config PATH`` would.

    Class paths are imported and every ``init_args`` key is checked against the class signature;
    raises ``jsonargparse.ArgumentError`` naming the bad key or value. Returns the config.
    """
    cli_cls = _lightning_cli_class()

    class _ParseOnly(cli_cls):  # type: ignore[valid-type, misc]
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    argv0, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = _ParseOnly(
            model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
            parser_kwargs=_parser_kwargs(), args=[subcommand, "--config", str(path), *overrides],
        )
    finally:
        sys.argv = argv0
    return cli.config


def fit_summary(trainer: Any, seconds: float, log_dir: str | Path) -> str:
    """The closing block of ``nirvana-pl fit``: numbers and where every output went; also writes run_summary.json.

    ``log_dir``: the run's folder (:func:`nirvana_pl.distributed.run_directory`, agreed by every rank).
    """
    from .callback import NirvanaPruningCallback
    from .modules import HeldOutPerplexity, SavePrunedModel
    from .report import write_markdown

    nirvana = [cb for cb in trainer.callbacks if isinstance(cb, NirvanaPruningCallback)]
    ppl_cb = next((cb for cb in trainer.callbacks if isinstance(cb, HeldOutPerplexity)), None)
    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SavePrunedModel)), None)
    log_dir = Path(log_dir)
    report_path = next((cb.report_path for cb in nirvana if cb.report_path is not None), None)
    out_dir = report_path.parent if report_path is not None else log_dir

    # each _summarize_* appends its lines to `lines` and its numbers/paths to `summary`
    lines = [f"\n=== nirvana-pl fit: done in {_duration(seconds)} (step {trainer.global_step}) ==="]
    summary: dict[str, Any] = {"seconds": round(seconds, 1), "global_step": trainer.global_step}
    _summarize_model(trainer.lightning_module, lines)
    _summarize_pruning(trainer, nirvana, lines, summary)
    if ppl_cb is not None and ppl_cb.results.get("final") is not None:
        _summarize_perplexity(trainer, ppl_cb, lines, summary)
    if saver is not None and saver.saved_to is not None:
        _summarize_saved_model(saver, lines, summary)
    if report_path is not None:
        _summarize_report(report_path, out_dir, lines, summary)
    _summarize_logs(trainer, log_dir, lines, summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "run_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    lines.append(f"run summary       {summary_path}")
    if report_path is not None:
        results = {"perplexity": summary.get("perplexity"),
                   "perplexity_after_each_prune": summary.get("perplexity_after_each_prune"),
                   "pruned_model": summary.get("pruned_model"),
                   "metrics": summary.get("metrics"), "run_summary": str(summary_path)}
        write_markdown(out_dir, results=results)
    return "\n".join(lines)


def _summarize_model(module: Any, lines: list[str]) -> None:
    hparams = getattr(module, "hparams", {})
    name = hparams.get("name_or_path") if hasattr(hparams, "get") else None
    model_name = type(getattr(module, "model", module)).__name__
    lines.append(f"model             {name} ({model_name})" if name else f"model             {model_name}")


def _summarize_pruning(trainer: Any, nirvana: list[Any], lines: list[str], summary: dict[str, Any]) -> None:
    """Parameter counts after the prune events, and the events the fit did not reach."""
    module = trainer.lightning_module
    events = [(cb.schedule.events[i].step, plan) for cb in nirvana for i, plan in enumerate(cb.plans)]
    if events:
        last = events[-1][1]
        steps = [step for step, _ in events]
        from .units import base_parameter_count

        params_now = base_parameter_count(getattr(module, "model", module))  # LoRA adapters excluded
        # Removed units are attention+MLP parameters only: dense total = now + what the plans removed.
        params_dense = params_now + last.dense_prunable_params - last.params_after
        summary.update(
            params_dense=params_dense, params_pruned=params_now, realised_sparsity=last.realised_sparsity,
            target_sparsity=last.target_sparsity, prune_steps=steps,
        )
        lines.append(
            f"params            {params_dense:,} -> {params_now:,}  "
            f"(attention+MLP sparsity {last.realised_sparsity:.1%}, target {last.target_sparsity:.0%}; "
            f"pruned at step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))})"
        )
    pending = [e for cb in nirvana for e in cb.pending_events]
    if pending:
        summary["events_not_reached"] = [{"step": e.step, "target_sparsity": e.sparsity} for e in pending]
        what = "NOT PRUNED, the model is dense" if not events else "pruned less than scheduled"
        lines.append(f"params            {what}: the fit ended at step {trainer.global_step}, before the prune at "
                     f"step{'s' if len(pending) > 1 else ''} {', '.join(str(e.step) for e in pending)} "
                     "(lower prune_at or raise max_steps / max_epochs)")


def _summarize_perplexity(trainer: Any, ppl_cb: Any, lines: list[str], summary: dict[str, Any]) -> None:
    """Held-out perplexity of HeldOutPerplexity: dense, after each prune, recovered."""
    res = ppl_cb.results
    pruned = res["after_prune"][-1]["ppl"] if res["after_prune"] else None
    ppl = {"dense": res["dense"], "just_pruned": pruned, "recovered": res["final"]}
    if res.get("dense_control") is not None:
        ppl.update(dense_control=res["dense_control"], gap_closed=res.get("gap_closed"))
    summary["perplexity"] = ppl
    summary["perplexity_after_each_prune"] = res["after_prune"]
    if len(res["after_prune"]) > 1:  # iterative: one number after each event
        after = ", ".join(f"{e['step']}: {e['ppl']:.3f}" for e in res["after_prune"])
        parts = [f"dense {res['dense']:.3f}"] if res["dense"] is not None else []
        parts += [f"after the prunes at steps {after}", f"recovered {res['final']:.3f}"]
    else:
        parts = [f"{k.replace('_', ' ')} {ppl[k]:.3f}" for k in ("dense", "just_pruned", "recovered")
                 if ppl[k] is not None]  # fmt: skip
    batches = ppl_cb._held_out(trainer)
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    t = int(batches[0]["input_ids"].shape[1]) if batches else 0
    lines.append(f"held-out ppl      {' | '.join(parts)}   ({n} windows of {t} tokens)")
    if "dense_control" in ppl:
        closed = f"recovery closed {ppl['gap_closed']:.0%}" if ppl["gap_closed"] is not None else "no gap to close"
        lines.append(
            f"dense control     {ppl['dense_control']:.3f}: the dense model at the prune, trained the same "
            f"{res['dense_control_steps']} steps on the same batches; {closed} of the log-perplexity gap to it"
        )
    for name, other in res.get("other_text", {}).items():
        summary.setdefault("perplexity_other_text", {})[name] = other
        after = other["after_prune"]
        values = [("dense", other["dense"]),
                  ("just pruned" if len(after) == 1 else "after each prune", after or None),
                  ("recovered", other["final"]), ("dense control", other["dense_control"])]  # fmt: skip
        parts = [f"{label} {', '.join(f'{v:.3f}' for v in value) if isinstance(value, list) else f'{value:.3f}'}"
                 for label, value in values if value is not None]  # fmt: skip
        label = f"held-out {name}"
        lines.append(f"{label:<17} {' | '.join(parts) or 'not measured'}   "
                     f"({other.get('windows', 0)} windows, never trained on)")  # fmt: skip


def _summarize_saved_model(saver: Any, lines: list[str], summary: dict[str, Any]) -> None:
    summary["pruned_model"] = str(saver.saved_to)
    check = (f"; reload check max |logit diff| {saver.reload_max_abs_diff:.1e}"
             if saver.reload_max_abs_diff is not None else "")
    lines.append(f"pruned model      {saver.saved_to}  (load: nirvana_pl.load_pruned(path){check})")
    if saver.gguf_saved_to is not None:
        summary["gguf"] = str(saver.gguf_saved_to)
        lines.append(f"llama.cpp file    {saver.gguf_saved_to}  (llama-cli -m PATH; README 'Run it in llama.cpp')")


def _summarize_report(report_path: Path, out_dir: Path, lines: list[str], summary: dict[str, Any]) -> None:
    from .plots import PLOT_NAME
    from .report import MARKDOWN_NAME

    summary["report_json"] = str(report_path)
    summary["report_markdown"] = str(out_dir / MARKDOWN_NAME)
    lines.append(f"prune report      {report_path}")
    lines.append(f"                  {out_dir / MARKDOWN_NAME}")
    if (out_dir / PLOT_NAME).is_file():
        summary["allocation_plot"] = str(out_dir / PLOT_NAME)
        lines.append(f"allocation plot   {out_dir / PLOT_NAME}")


def _summarize_logs(trainer: Any, log_dir: Path, lines: list[str], summary: dict[str, Any]) -> None:
    """Where the logger's metrics, the checkpoints and the saved config are."""
    logger = trainer.logger
    if logger is not None:
        metrics_dir = Path(getattr(logger, "log_dir", None) or log_dir)
        metrics = metrics_dir / "metrics.csv" if (metrics_dir / "metrics.csv").is_file() else metrics_dir
        summary["metrics"] = str(metrics)
        lines.append(f"metrics           {metrics}  ({type(logger).__name__})")
    checkpoint = getattr(trainer, "checkpoint_callback", None)
    if checkpoint is not None and checkpoint.dirpath and Path(checkpoint.dirpath).is_dir():
        summary["checkpoints"] = str(checkpoint.dirpath)
        last = f"  (resume: --ckpt_path {checkpoint.last_model_path})" if checkpoint.last_model_path else ""
        lines.append(f"checkpoints       {checkpoint.dirpath}{last}")
    if (log_dir / "config.yaml").is_file():
        summary["config"] = str(log_dir / "config.yaml")
        lines.append(f"config            {log_dir / 'config.yaml'}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


# ----------------------------------------------------------------------------------------- prune / eval
PRUNED_MODEL_FOLDER = "pruned_model"


def _prune_report_files() -> tuple[str, ...]:
    """The files `prune` writes into OUT next to the pruned model folder."""
    from .plots import PLOT_NAME
    from .report import MARKDOWN_NAME, REPORT_NAME

    return ("plan.json", REPORT_NAME, MARKDOWN_NAME, PLOT_NAME, "run_summary.json")


def _warn_if_slow_bf16(dtype: str, command: str) -> None:
    """These commands compute on the CPU: a bfloat16 model there is many times slower without native bf16."""
    from .hardware import slow_bf16_message

    if slow := slow_bf16_message(dtype, True, command, fix="Pass --dtype float32."):
        warnings.warn(slow, stacklevel=3)


def _check_prune_out(out: str, model: str, tokenizer: str | None, overwrite: bool) -> None:
    """Before any work: OUT is never an input's folder, inside one or around one; a non-empty OUT needs overwrite."""
    import os

    from .export import check_save_target

    out_dir, target = Path(out), Path(os.path.realpath(out))
    for option, value in (("model", model), ("tokenizer", tokenizer)):
        if value is None or not Path(value).exists():
            continue  # a hub id, embedded:..., bytes
        source = Path(os.path.realpath(value))
        if target == source or target in source.parents or source in target.parents:
            raise ConfigError(
                f"out={out!r} overlaps the input {option}={value!r}: the run would write over what it reads, so this "
                "is refused even with --overwrite. Pass an --out folder that neither is, holds nor lies inside "
                f"{value!r}."
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out={out!r} is a file; pass a folder path for --out.")
    names = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if names and not overwrite:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"out={out!r} is not empty ({shown}); pass --overwrite true to replace an earlier result there, or choose "
            "another --out folder."
        )
    try:
        check_save_target(out_dir / PRUNED_MODEL_FOLDER)
    except OSError as err:
        raise ConfigError(
            f"out={out!r}: {err} (--overwrite replaces an earlier prune result only: move that folder away or choose "
            "another --out folder.)"
        ) from err


def prune_command(
    model: str,
    out: str = "runs/prune",
    overwrite: bool = False,
    sparsity: float = 0.3,
    saliency: Literal["functional", "taylor_loss", "wanda_sp", "magnitude", "random"] = "functional",
    gamma: float = 3.0,  # allocate.DEFAULT_GAMMA (not imported: this module loads without torch)
    calibration_windows: int = 32,
    calibration_batch_size: int = 8,
    evaluate: bool = True,
    uniform: bool = False,
    min_kv_groups: int = 1,
    min_mlp_channels: int = 0,
    mlp_round_to: int = 8,
    expert_share: float = 0.5,
    min_experts: int = 1,
    router_load: float = 1.0,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    tokenizer: str | None = None,
    seed: int = 0,
    data: Any = None,
) -> dict[str, Any]:
    """One-shot NIRVANA pruning: score on calibration windows, prune, save the model folder and the report.

    Args:
        model: a model folder, a hub id, or embedded:smollm2.
        out: output folder: the pruned model goes to OUT/pruned_model, the reports next to it. It must be new or
            empty (see overwrite) and may not be, hold or lie inside the input model's (or tokenizer's) folder.
        overwrite: replace an earlier result in a non-empty OUT: its pruned_model folder is replaced whole and
            the report files are rewritten; other files in OUT are left alone.
        sparsity: fraction of the attention+MLP parameters to remove.
        saliency: how units are scored (the Adam-state estimators need a training run: use `fit`).
        gamma: MLP fraction removed over KV-group fraction removed.
        calibration_windows: number of training windows of the data used to score.
        calibration_batch_size: windows per calibration batch.
        evaluate: held-out perplexity (the data's validation windows) before and after pruning.
        uniform: keep every layer the same width (a stock config describes the result).
        min_kv_groups: KV groups kept in every layer at least.
        min_mlp_channels: MLP channels kept in every layer at least (0: a layer's MLP may go entirely).
        mlp_round_to: MLP widths are multiples of this.
        expert_share: mixture-of-experts models: the share of the MLP cut taken as whole experts (0: channels inside
            the experts only, 1: whole experts only).
        min_experts: mixture-of-experts models: experts kept in every layer at least.
        router_load: mixture-of-experts models: power of an expert's share of the routed calibration tokens in its
            score (0: ignore the router's load).
        dtype: parameter dtype while scoring and in the saved folder.
        tokenizer: tokenizer name or folder (default: the model's own); `bytes` for byte-level models.
        seed: seed of scoring (random) and of the data split.
        data: the text (see TextDataModule).
    """
    import nirvana_pl

    from .allocate import DenseReference
    from .arch import architecture_of
    from .export import save_pruned
    from .modules import load_model, load_tokenizer, perplexity
    from .report import PruneRecord, format_summary, write_markdown, write_report
    from .units import prunable_parameter_count

    start = time.perf_counter()
    _check_prune_out(out, model, tokenizer, overwrite)  # fail fast, before loading anything
    _warn_if_slow_bf16(dtype, "nirvana-pl prune")
    tok = load_tokenizer(tokenizer or model)
    net = load_model(model, dtype=dtype).eval()
    data.tokenizer = tok
    _check_data_fits(data, net)
    data.setup("fit")
    train = data.splits["train"]
    if calibration_windows > train.shape[0]:
        raise ConfigError(
            f"calibration_windows={calibration_windows} but the data has {train.shape[0]} training windows."
        )
    windows = train[:calibration_windows]
    calibration = [
        windows[i : i + calibration_batch_size] for i in range(0, calibration_windows, calibration_batch_size)
    ]
    held_out = data.held_out_batches("val") if evaluate and data.val_windows else []
    ppl_dense = perplexity(net, held_out, progress=True, desc="perplexity (dense)") if held_out else None

    reference = DenseReference.of(net)
    before = sum(p.numel() for p in net.parameters())
    t0 = time.perf_counter()
    plan = nirvana_pl.prune(
        net, sparsity, saliency, calibration, gamma, min_kv_groups=min_kv_groups, min_mlp_channels=min_mlp_channels,
        mlp_round_to=mlp_round_to, uniform=uniform, expert_share=expert_share, min_experts=min_experts,
        router_load=router_load, reference=reference, seed=seed, progress=True,
    )
    record = PruneRecord(0, plan, before, sum(p.numel() for p in net.parameters()), prunable_parameter_count(net),
                         time.perf_counter() - t0, caveat=architecture_of(net).caveat)
    print(format_summary(record, reference), flush=True)
    ppl_pruned = perplexity(net, held_out, progress=True, desc="perplexity (pruned)") if held_out else None

    out_dir = Path(out)
    model_dir = save_pruned(
        net, out_dir / PRUNED_MODEL_FOLDER, tokenizer=tok if hasattr(tok, "save_pretrained") else None
    )
    for name in _prune_report_files():  # an earlier run's: this run may not write each one (the plot)
        (out_dir / name).unlink(missing_ok=True)
    plan.save(out_dir / "plan.json")
    report = write_report(out_dir, [record], reference)
    result = {
        "model": model, "pruned_model": str(model_dir), "report_json": str(report), "plan": str(out_dir / "plan.json"),
        "params_dense": before, "params_pruned": record.total_params_after,
        "realised_sparsity": record.realised_sparsity,
        "perplexity": {"dense": ppl_dense, "just_pruned": ppl_pruned} if held_out else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "run_summary.json").write_text(json.dumps(result, indent=2))
    write_markdown(out_dir, results={"perplexity": result["perplexity"], "pruned_model": str(model_dir),
                                     "run_summary": str(out_dir / "run_summary.json")})
    lines = [f"\n=== nirvana-pl prune: done in {_duration(result['seconds'])} ==="]
    lines.append(f"params            {before:,} -> {record.total_params_after:,}  (attention+MLP sparsity "
                 f"{record.realised_sparsity:.1%}, target {sparsity:.0%}, {saliency}, gamma {gamma:g})")
    if held_out:
        n = sum(int(b["input_ids"].shape[0]) for b in held_out)
        lines.append(
            f"held-out ppl      dense {ppl_dense:.3f} | pruned {ppl_pruned:.3f}   "
            f"({n} windows of {data.seq_len} tokens)"
        )
    lines.append(f"pruned model      {model_dir}")
    lines.append(f"prune report      {report}")
    from .plots import PLOT_NAME

    if (out_dir / PLOT_NAME).is_file():
        lines.append(f"allocation plot   {out_dir / PLOT_NAME}")
    lines.append(f"run summary       {out_dir / 'run_summary.json'}")
    print("\n".join(lines), flush=True)
    return result


def eval_command(
    model: str,
    split: Literal["val", "test", "train", "all"] = "val",
    max_windows: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    tokenizer: str | None = None,
    json_out: str | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Perplexity of a model (folder, hub id or embedded:smollm2) on text.

    Args:
        model: a model folder (pruned folders included), a hub id, or embedded:smollm2.
        split: which windows of the data: `val` (the held-out windows a `fit` with the same data options
            reports on), `test`, `train`, or `all`.
        max_windows: evaluate at most this many windows (None: all of the split).
        dtype: parameter dtype.
        tokenizer: tokenizer name or folder (default: the model's own); `bytes` for byte-level models.
        json_out: also write the result to this JSON file.
        data: the text (see TextDataModule).
    """
    from .modules import EMBEDDED_MODELS, check_model_folder, load_model, load_tokenizer, local_model_path, perplexity

    start = time.perf_counter()
    # A wrong path or a folder without its weights is the model's fault: say so before the tokenizer (loaded
    # first, it would be blamed) and before a long model load.
    local = local_model_path(model, "model") if model not in EMBEDDED_MODELS else None
    if local is not None and (Path(local) / "config.json").is_file():
        check_model_folder(Path(local), "model")
    tok = load_tokenizer(tokenizer or model)
    _warn_if_slow_bf16(dtype, "nirvana-pl eval")
    net = load_model(model, dtype=dtype, seq2seq=_is_seq2seq(model), what="model").eval()
    data.purpose = "evaluation"  # (TextDataModule's error messages name what the text is for)
    seq2seq = bool(getattr(net.config, "is_encoder_decoder", False))
    if seq2seq:
        data.format = "seq2seq"
    data.tokenizer = tok
    _check_data_fits(data, net)
    if split == "all":
        data.val_windows, data.test_windows = 0, 0
        split_name = "train"
    else:
        split_name = split
    data.setup("fit")
    windows = data.splits[split_name]
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.shape[0] == 0:
        raise ConfigError(
            f"split={split!r} has no windows with these data options (val_windows / test_windows are 0?)."
        )
    from .datamodule import WindowDataset
    from torch.utils.data import DataLoader

    batches = list(DataLoader(WindowDataset(windows, data.format), batch_size=data.eval_batch_size))
    ppl = perplexity(net, batches, seq2seq, progress=True, desc=f"perplexity ({split})")
    result = {"model": model, "perplexity": ppl, "split": split, "windows": int(windows.shape[0]),
              "seq_len": data.seq_len, "source": str(data.source), "seconds": round(time.perf_counter() - start, 1)}
    print(f"perplexity {ppl:.3f}  ({model}; {result['windows']} {split} windows of {data.seq_len} tokens "
          f"from {data.source}; {result['seconds']} s)", flush=True)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result


def _is_seq2seq(model: str) -> bool:
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        return bool(json.loads(cfg.read_text()).get("is_encoder_decoder", False))
    return False


def _check_data_fits(data: Any, model: Any) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and not getattr(model.config, "is_encoder_decoder", False) and data.seq_len > max_pos:
        raise ConfigError(f"data.seq_len={data.seq_len} is longer than the model's max_position_embeddings={max_pos}.")


def _one_shot_parser(name: str) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .datamodule import TextDataModule

    fn = prune_command if name == "prune" else eval_command
    doc = (fn.__doc__ or "").strip().splitlines()[0]
    parser = ArgumentParser(prog=f"nirvana-pl {name}", description=doc, exit_on_error=True)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_function_arguments(fn, skip={"data"}, fail_untyped=True)
    parser.add_class_arguments(
        TextDataModule, "data", skip={"tokenizer"}, help="the text: the same options as the datamodule of a recipe"
    )
    return parser


def run_one_shot(name: str, argv: Sequence[str]) -> dict[str, Any]:
    from .datamodule import TextDataModule

    parser = _one_shot_parser(name)
    cfg = parser.parse_args(list(argv))
    kwargs = cfg.as_dict()
    kwargs.pop("config", None)
    data_kwargs = kwargs.pop("data")
    try:
        data = TextDataModule(**data_kwargs, tokenizer=kwargs.get("tokenizer"))
        fn = prune_command if name == "prune" else eval_command
        return fn(data=data, **kwargs)
    except ConfigError as err:
        parser.error(str(err))
    except (ValueError, FileNotFoundError) as err:
        parser.error(f"{type(err).__name__}: {err}")
    raise AssertionError("unreachable")


def readable_parse_error(message: str) -> str:
    """jsonargparse's nested Union report cut down to the key, the class, what is wrong and what it accepts."""
    import difflib
    import inspect
    import re

    top = re.match(r'Parser key "([^"]+)":', message)
    option = re.search(r"(?:does not accept option '|unrecognized arguments: --)([\w.]+)", message)
    if option and option.group(1).startswith("trainer."):
        from lightning.pytorch import Trainer

        accepted = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
        close = difflib.get_close_matches(option.group(1).split(".", 1)[1], accepted, n=1)
        return message + (f" (did you mean 'trainer.{close[0]}'?)" if close else "") + (
            f". Trainer accepts: {', '.join(accepted)}"
        )
    problem = re.search(r"Problem with given class_path '([\w.]+)':\n((?:\s{6,}.*\n?)+)", message)
    if not problem:
        return message
    class_path, detail = problem.group(1), " ".join(line.strip() for line in problem.group(2).splitlines())
    where = f"{top.group(1)} ({class_path})" if top else class_path
    text = f"{where}: {detail}"
    unknown = re.search(r"(?:Option|Key) '([^']+)' is not accepted", detail) or re.search(
        r'Key "([^"]+)" is not expected', detail
    )
    if unknown:
        try:
            module, _, name = class_path.rpartition(".")
            cls = getattr(__import__(module, fromlist=[name]), name)
            accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        except Exception:  # noqa: BLE001 - the message is still useful without the list
            return text
        close = difflib.get_close_matches(unknown.group(1), accepted, n=1)
        if close:
            text += f" (did you mean '{close[0]}'?)"
        text += f". {cls.__name__} accepts: {', '.join(accepted)}"
    return text


# ----------------------------------------------------------------------------------------- export
def export_command(
    model: str,
    gguf: str,
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16",
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a (pruned) model folder as one GGUF file that llama.cpp, Ollama and LM Studio run.

    Args:
        model: a model folder (pruned folders included), a hub id, or embedded:smollm2.
        gguf: the file to write (ends in .gguf).
        dtype: weight type of the matrices (norms and biases stay f32; q8_0 keeps f16 for rows that do not fill
            32-value blocks).
        tokenizer: where the vocabulary comes from: a .gguf file of the base model (its tokenizer is copied), a
            tokenizer folder or hub id (default: the model's own folder); embedded:smollm2 copies the SmolLM2
            GGUF's tokenizer.
        overwrite: replace an existing file.
    """
    from .gguf_export import vocabulary_source, write_gguf
    from .modules import load_model

    out = Path(gguf)
    if out.exists() and not overwrite:
        raise ConfigError(f"gguf={gguf!r} exists; pass --overwrite true to replace it, or choose another file.")
    vocab = vocabulary_source(tokenizer or model)
    start = time.perf_counter()
    net = load_model(model).eval()
    result = write_gguf(net, out, tokenizer=vocab, dtype=dtype)
    print(result.summary(), flush=True)
    return {"model": model, "gguf": str(result.path), "arch": result.arch, "dtype": dtype, "bytes": result.bytes,
            "notes": result.notes, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def run_export(argv: Sequence[str]) -> dict[str, Any]:
    from jsonargparse import ActionConfigFile, ArgumentParser

    doc = (export_command.__doc__ or "").strip().splitlines()[0]
    parser = ArgumentParser(prog="nirvana-pl export", description=doc, exit_on_error=True)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_function_arguments(export_command, fail_untyped=True)
    kwargs = parser.parse_args(list(argv)).as_dict()
    kwargs.pop("config", None)
    try:
        return export_command(**kwargs)
    except ConfigError as err:
        parser.error(str(err))
    except (ValueError, FileNotFoundError) as err:
        parser.error(f"{type(err).__name__}: {err}")
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nirvana-pl`` console script; returns the exit status (0)."""
    run_command(argv)
    return 0


def run_command(argv: Sequence[str] | None = None) -> Any:
    """Run one ``nirvana-pl`` command; returns the LightningCLI object (fit/validate/test) or the result dict."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(OVERVIEW)
        return None
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"nirvana-pl {__version__}")
        return None
    command = args[0]
    if command in ("prune", "eval"):
        return run_one_shot(command, args[1:])
    if command == "export":
        return run_export(args[1:])
    if command not in TRAINER_COMMANDS:
        print(OVERVIEW, file=sys.stderr)
        print(f"nirvana-pl: error: unknown command {command!r}; choose one of fit, validate, test, prune, eval, "
              "export.", file=sys.stderr)
        raise SystemExit(2)
    from jsonargparse import ArgumentError

    try:
        return run_lightning_cli(None if argv is None else args)
    except (ConfigError, ArgumentError) as err:
        message = str(err) if isinstance(err, ConfigError) else readable_parse_error(str(err))
        print(f"nirvana-pl {command}: error: {message}", file=sys.stderr)
        print(f"(`nirvana-pl {command} --help` lists every option; `--print_config` shows the resolved config)",
              file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
